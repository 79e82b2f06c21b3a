"""The scaling experiment (efficient_attn/sweeps/scaling.py): its flags, its presets' checks, one
real row on the one device of this process, resumption from the store, the rendered table."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from efficient_attn.sweeps import scaling


@pytest.mark.parametrize("argv, message", [
    (["--variants", "full"], "--variants: this experiment measures the parallel engines"),
    (["--variants", ","], "--variants: expected at least one comma-separated name"),
    (["--engines", "rung"], "--engines: unknown engine 'rung'; did you mean ring?"),
    (["--engines", ","], "--engines: expected at least one comma-separated name"),
    (["--devices", "0"], "--devices: expected comma-separated positive integers, got '0'"),
    (["--devices", "2,x"], "--devices: expected comma-separated positive integers, got '2,x'"),
    (["--devices", "-2"], "--devices: expected comma-separated positive integers"),
    # parsed, then refused by the config: strong scaling of 5 x 1024 positions cannot split over 2 x 3
    (["--preset", "cpu", "--devices", "3,5"], "scaling: strong mode's length 5120 is not divisible by 2P"),
    (["--preset", "huge"], "--preset: invalid choice: 'huge'"),
    (["--plugin", "{tmp}"], "--plugin: {tmp} is a directory, expected a .py file"),
    (["--plugin", "{tmp}/missing.py"], "--plugin: {tmp}/missing.py does not exist, expected a .py file"),
])
def test_bad_flags_exit_2_with_one_line_naming_the_flag(argv, message, tmp_path, capsys, monkeypatch):
    # a bad flag is refused in the parent, before any child process or measurement
    monkeypatch.setattr(scaling.subprocess, "run", lambda *a, **k: pytest.fail("a bad flag started the child"))
    with pytest.raises(SystemExit) as exit_:
        scaling.main([a.format(tmp=tmp_path) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert err.startswith("efficient-attn scaling: error: ") and message.format(tmp=tmp_path) in err, err


def test_the_child_runs_the_parents_config_and_dies_with_it(monkeypatch, tmp_path):
    """The child measures what the parent resolved (a preset the caller added included), told
    by its environment; and it is set to die with its parent (a SIGKILLed command must not
    leave a child appending rows beside the rerun's)."""
    tiny = scaling.ScalingConfig("tiny_test", per_device=8, devices=(1, 2), engines=("ring",), modes=("weak",))
    monkeypatch.setitem(scaling.PRESETS, "tiny_test", lambda: tiny)
    started = {}

    def child(cmd, env):
        started.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(scaling.subprocess, "run", child)
    assert scaling.main(["--preset", "tiny_test", "--devices", "2,4", "--out", str(tmp_path)]) == 0
    env = started["env"]
    assert "--xla_force_host_platform_device_count=4" in env["XLA_FLAGS"]
    assert env[scaling._PARENT] == str(os.getpid()) and env[scaling._CHILD] == "1"
    handed = scaling._config_from_json(env[scaling._CONFIG])
    assert handed == dataclasses.replace(tiny, devices=(2, 4))
    # the child: the handed config is what it runs, though its own PRESETS lack the name
    monkeypatch.delitem(scaling.PRESETS, "tiny_test")
    ran = {}
    monkeypatch.setattr(scaling, "run", lambda cfg, out, **k: ran.update(cfg=cfg, out=out) or [])
    monkeypatch.setattr(scaling, "_die_with_parent", lambda pid: ran.update(parent=pid))
    for k, v in env.items():
        if k.startswith("EFFICIENT_ATTN_SCALING"):
            monkeypatch.setenv(k, v)
    assert scaling.main(started["cmd"][3:]) == 0
    assert ran == {"parent": os.getpid(), "cfg": handed, "out": tmp_path}


def test_configs_refuse_lengths_the_placement_cannot_split():
    with pytest.raises(ValueError, match="must be even"):
        scaling.ScalingConfig("x", per_device=33)
    with pytest.raises(ValueError, match="unknown"):
        scaling.ScalingConfig("x", per_device=32, engines=("ring", "tree"))
    for make in scaling.PRESETS.values():
        make()  # the presets themselves are valid


def test_one_row_measured_stored_and_rendered(tmp_path, monkeypatch):
    cfg = scaling.ScalingConfig("t", per_device=16, devices=(1,), engines=("ring",), modes=("weak",), heads=1,
                                head_dim=8, time_budget_s=0.01)
    rows = scaling.run(cfg, tmp_path, progress=False)
    (row,) = rows
    assert row["status"] == "ok", row
    assert row["length"] == 16 and row["per_device_length"] == 16
    assert row["memory_per_device"] >= row["argument_per_device"] >= 4 * 16 * 8 * 4  # q, k, v, w at least
    assert row["comm_per_device"] == row["comm_formula"] == 0  # one device: nothing goes round the ring
    table = (tmp_path / "table.md").read_text()
    assert scaling.TIME_NOTE in table and "| ring | 1 | 16 | 16 |" in table
    assert json.loads((tmp_path / "rows.json").read_text())["rows"][0]["engine"] == "ring"

    def refuse(*args):
        raise AssertionError("a finished row was measured again")

    monkeypatch.setattr(scaling, "_measure", refuse)
    assert scaling.run(cfg, tmp_path, progress=False) == rows  # resumed from rows.jsonl


def test_the_lm_row_is_a_whole_training_step(tmp_path):
    """The "lm" engine: a causal LM's parameter gradient, its attention made ring attention on
    the one-device mesh too (the baseline runs the same kernels): parameters are arguments, the
    activations temporaries, nothing goes round a ring of one."""
    cfg = scaling.ScalingConfig("t", per_device=16, devices=(1,), engines=("lm",), modes=("weak",), heads=2,
                                head_dim=8, lm_layers=1, lm_vocab=32, time_budget_s=0.01)
    (row,) = scaling.run(cfg, tmp_path, progress=False)
    assert row["status"] == "ok", row
    width = 2 * 8  # embeddings, attention and MLP (4x) weights of one layer, float32, at least
    assert row["argument_per_device"] >= 4 * (32 * width + 4 * width * width + 2 * width * 4 * width)
    assert row["temp_per_device"] > 0 and row["comm_per_device"] == 0 and row["comm_formula"] is None
    assert "| lm | 1 | 16 | 16 |" in (tmp_path / "table.md").read_text()


def test_more_devices_than_the_process_has_is_refused(tmp_path):
    cfg = scaling.ScalingConfig("t", per_device=16, devices=(1, 64))
    with pytest.raises(RuntimeError, match="needs 64 devices"):
        scaling.run(cfg, tmp_path, progress=False)


CHILD = """
import sys, time
from pathlib import Path
from efficient_attn.sweeps.scaling import _die_with_parent
_die_with_parent(int(sys.argv[1]))
Path(sys.argv[2]).write_text("ready")
time.sleep(300)
"""

PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]])
print(child.pid, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:  # a zombie (killed, not yet reaped by whoever adopted it) is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sigkilled_parent_takes_its_child_with_it(tmp_path):
    ready = tmp_path / "ready"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(ready)], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert time.monotonic() < deadline and parent.poll() is None, "the child never got ready"
            time.sleep(0.05)
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
