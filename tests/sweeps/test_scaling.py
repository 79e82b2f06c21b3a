"""The scaling experiment (efficient_attn/sweeps/scaling.py): its flags, its presets' checks, one
real row on the one device of this process, resumption from the store, the rendered table."""

from __future__ import annotations

import json

import pytest

from efficient_attn.sweeps import scaling


@pytest.mark.parametrize("argv, message", [
    (["--variants", "full"], "--variants: this experiment measures the parallel engines"),
    (["--engines", "rung"], "--engines: unknown engine 'rung'; did you mean ring?"),
    (["--devices", "0"], "--devices: expected comma-separated positive integers"),
    (["--preset", "huge"], "--preset: invalid choice"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        scaling.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


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


def test_more_devices_than_the_process_has_is_refused(tmp_path):
    cfg = scaling.ScalingConfig("t", per_device=16, devices=(1, 64))
    with pytest.raises(RuntimeError, match="needs 64 devices"):
        scaling.run(cfg, tmp_path, progress=False)
