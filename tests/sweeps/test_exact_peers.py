"""The exact benchmark's peers preset (efficient_attn/sweeps/exact/peers.py, peer_rows.py,
peer_report.py): rows into the RowStore, every implementation checked against ``full``
before it is timed, missing and wrong peers recorded with their reasons, the table from the
stored rows only, resumption; the real peers' loaders where the extra is installed.

One tiny run (N = 128, both masks, both passes: four rows) is measured for the module, on
stand-in peers put in ``peers.LOADERS``, so that it needs no extra: one that agrees with full,
one that is off by 0.01 (wrong), one not installed and one without a causal mode. The other
tests copy its folder. The real peers' tests skip unless their package is installed.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import efficient_attn as ea
from efficient_attn.report import RowStore
from efficient_attn.sweeps import exact
from efficient_attn.sweeps.exact import cli as exact_cli
from efficient_attn.sweeps.exact import peer_rows, peers, presets, programs, units
from efficient_attn.sweeps.exact.config import PEERS, ExactConfig
from efficient_attn.sweeps.exact.run import is_done
from efficient_attn.sweeps.exact.timing import time_interleaved
from efficient_attn.variants.full import full_attention

TINY = dataclasses.replace(presets.peers(), lengths=(128,), heads=2, head_dim=8, matmul_n=64)
GOOD, WRONG, MISSING, NO_CAUSAL = PEERS  # the role each stand-in plays under a real peer's name
ROWS = [(False, "fwd"), (False, "fwd_bwd"), (True, "fwd"), (True, "fwd_bwd")]
CALLS: collections.Counter = collections.Counter()  # executions of each stand-in's compiled program
_REAL_MEASURE = units.measure_unit


def _counted(name: str, offset: float = 0.0):
    """A stand-in peer: jax.nn.dot_product_attention (+ offset), counting its executions."""

    def attend(q, k, v, causal):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=causal) + offset
        jax.debug.callback(lambda _: CALLS.update([name]), out[0, 0, 0, 0])
        return out

    return attend


STAND_INS = {
    GOOD: lambda: peers.Peer(_counted(GOOD), "stand-in: jax.nn"),
    WRONG: lambda: peers.Peer(_counted(WRONG, 0.01), "stand-in: jax.nn + 0.01"),
    MISSING: lambda: peers.Peer(None, "not installed on purpose: pip install -e '.[peers]'"),
    NO_CAUSAL: lambda: peers.Peer(_counted(NO_CAUSAL), "stand-in: no causal mode", causal=False),
}


def _use_stand_ins(mp) -> None:
    mp.setitem(presets.PRESETS, "peers", lambda: TINY)
    for name, loader in STAND_INS.items():
        mp.setitem(peers.LOADERS, name, loader)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def peers_run(tmp_path_factory):
    """``main --preset peers`` at the tiny preset: (its folder, exit status, table bytes, calls)."""
    out = tmp_path_factory.mktemp("peers")
    CALLS.clear()
    with pytest.MonkeyPatch.context() as mp:
        _use_stand_ins(mp)
        rc = exact.main(["--preset", "peers", "--out", str(out), "--no-progress"])
    return out, rc, (out / "table.md").read_bytes(), dict(CALLS)


@pytest.fixture
def copy_of(peers_run, tmp_path, monkeypatch):
    _use_stand_ins(monkeypatch)
    dst = tmp_path / "run"
    shutil.copytree(peers_run[0], dst)
    return dst


def test_each_row_checks_every_implementation_then_times_the_agreeing_ones_together(peers_run):
    out, rc, table, _ = peers_run
    assert rc == 0
    stored = [rec["row"] for rec in _lines(out / "rows.jsonl")]
    assert [(r["kind"], r["n"], r["causal"], r["pass"]) for r in stored] == [("peers", 128, c, p) for c, p in ROWS]
    for row in stored:
        assert row["status"] == "ok" and list(row["impls"]) == ["blockwise", "jax.nn.dot_product_attention", *PEERS]
        rate = row["matmul"]["flops"] / row["matmul"]["median_s"]
        assert row["flops"] == programs.attention_flops(128, 1, 2, 8, causal=row["causal"],
                                                        backward=row["pass"] == "fwd_bwd")
        timed = ["blockwise", "jax.nn.dot_product_attention", GOOD] + ([] if row["causal"] else [NO_CAUSAL])
        for name in timed:
            cell = row["impls"][name]
            assert cell["status"] == "ok" and len(cell["times_s"]) == TINY.repeats and cell["median_s"] > 0
            assert cell["max_abs_err"] <= peer_rows.ATOL
            assert set(cell["errors"]) == ({"out"} if row["pass"] == "fwd" else {"out", "dq", "dk", "dv"})
            assert cell["matmul_fraction"] == pytest.approx(row["flops"] / cell["median_s"] / rate)
        wrong = row["impls"][WRONG]
        assert wrong["status"] == "error" and "median_s" not in wrong and "times_s" not in wrong
        assert wrong["max_abs_err"] == pytest.approx(0.01, rel=1e-3)  # the output is off by 0.01 everywhere
        assert "disagrees with full" in wrong["reason"] and "(in out)" in wrong["reason"]
        assert row["impls"][MISSING] == {"status": "missing", "reason": STAND_INS[MISSING]().note}
        if row["causal"]:
            assert row["impls"][NO_CAUSAL]["status"] == "unsupported"


def test_a_wrong_peer_runs_only_its_checked_call_and_the_check_costs_no_call(peers_run):
    calls = peers_run[3]
    assert calls[WRONG] == len(ROWS)  # one call a row: the check; never timed
    # the agreeing stand-in: its checked call is the settle call of the round, then the timed call
    assert calls[GOOD] == len(ROWS) * TINY.repeats * (1 + TINY.peer_settle)
    assert calls[NO_CAUSAL] == 2 * TINY.repeats * (1 + TINY.peer_settle)  # the non-causal rows only
    assert MISSING not in calls


def test_the_table_shows_each_cell_the_best_peer_and_every_reason(peers_run):
    text = peers_run[2].decode()
    for title in ("## forward, non-causal", "## forward + backward, non-causal", "## forward, causal",
                  "## forward + backward, causal", "## Agreement with full", "## Settings"):
        assert title in text
    header = ("| N | blockwise ms | jax.nn.dot_product_attention ms | tokamax.xla ms | tokamax.xla_chunked ms | "
              "memory_efficient_attention ms | ringattention ms | best peer | blockwise speed-up vs best peer |")
    assert text.count(header) == 4
    assert text.count(" | error | not installed | ") == 4  # the wrong and the missing column of each row
    assert "## Peers not installed\n\n- memory_efficient_attention: not installed on purpose" in text
    assert "| causal | fwd | 128 | tokamax.xla_chunked | error | disagrees with full: max abs error 0.01" in text
    assert "| causal | fwd_bwd | 128 | ringattention | no causal mode | ringattention has no causal mode |" in text
    assert "- tokamax.xla: stand-in: jax.nn" in text and "- blockwise: blockwise_attention's defaults" in text
    assert f"{TINY.repeats} interleaved round(s) (one round from N = {TINY.peer_one_round_from_n}" in text
    assert "`full` is the reference only, not timed here" in text


def test_report_only_renders_the_stored_rows_and_measures_nothing(copy_of, peers_run, monkeypatch):
    monkeypatch.setattr(units, "measure_unit", _never)
    (copy_of / "table.md").unlink()
    assert exact.main(["--preset", "peers", "--out", str(copy_of), "--report-only"]) == 0
    assert (copy_of / "table.md").read_bytes() == peers_run[2]


def _never(unit, cfg):
    raise AssertionError("measured although the rows are stored")


def test_a_killed_run_resumes_without_redoing_finished_rows(copy_of, monkeypatch):
    store = copy_of / "rows.jsonl"
    lines = store.read_bytes().split(b"\n")
    store.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][: len(lines[2]) // 2])  # killed mid-append
    seen = []

    def measure(unit, cfg):
        seen.append((unit.causal, unit.pass_name))
        return _REAL_MEASURE(unit, cfg)

    monkeypatch.setattr(units, "measure_unit", measure)
    assert exact.main(["--preset", "peers", "--out", str(copy_of), "--no-progress"]) == 0
    assert seen == ROWS[2:]
    after = _lines(store)
    assert [json.loads(line) for line in lines[:2]] == after[:2] and len(after) == 4
    assert [r["row"]["causal"] for r in after] == [c for c, _ in ROWS]
    assert "## forward + backward, causal" in (copy_of / "table.md").read_text()


def test_a_row_that_found_a_peer_missing_is_measured_again_once_it_is_installed(copy_of, monkeypatch):
    row = _lines(copy_of / "rows.jsonl")[0]["row"]
    assert is_done(row)
    monkeypatch.setitem(peers.LOADERS, MISSING, lambda: peers.Peer(_counted(MISSING), "installed now"))
    assert not is_done(row)
    assert is_done({**row, "impls": {k: v for k, v in row["impls"].items() if k != MISSING}})


def test_the_peers_keys_never_meet_the_quick_and_huge_keys_and_the_committed_quick_rows_are_found():
    keys = {p: {units.row_key(u, presets.PRESETS[p]()) for u in units.units(presets.PRESETS[p]())}
            for p in ("quick", "huge", "peers")}
    assert not keys["peers"] & (keys["quick"] | keys["huge"]) and len(keys["peers"]) == 16
    assert all("|peers|" in k and "impls=blockwise,jax.nn.dot_product_attention," in k for k in keys["peers"])
    committed = Path(__file__).resolve().parents[2] / "results" / "exact" / "rows.jsonl"
    if committed.exists():  # the quick table is resumed from them, never re-measured
        store = RowStore(committed)
        assert all(store.get(k) is not None for k in keys["quick"])


def test_a_peer_over_the_call_budget_is_recorded_and_not_timed(tmp_path, monkeypatch):
    _use_stand_ins(monkeypatch)
    cfg = dataclasses.replace(TINY, lengths=(64,), peer_causal=(False,), peers=(GOOD,), peer_call_budget_s=1e-9)
    exact.run(cfg, tmp_path, log=lambda *a: None)
    rows = [rec["row"] for rec in _lines(tmp_path / "rows.jsonl")]
    assert len(rows) == 2
    for row in rows:
        assert row["impls"]["blockwise"]["status"] == "ok"  # ours is never dropped: the ratios need it
        for name in ("jax.nn.dot_product_attention", GOOD):
            cell = row["impls"][name]
            assert cell["status"] == "over_budget" and "median_s" not in cell and cell["max_abs_err"] <= 1e-3
            assert "over the per-call budget of 1e-09 s" in cell["reason"]
    text = (tmp_path / "table.md").read_text()
    assert "| 64 | " in text and " | over budget | over budget | - | - | " in text


def test_blockwise_disagreeing_with_full_is_an_error_of_the_row(tmp_path, monkeypatch, capsys):
    _use_stand_ins(monkeypatch)
    real = programs.impls

    def off(causal):
        fns = real(causal)
        return {**fns, "blockwise": lambda q, k, v: fns["blockwise"](q, k, v) * 1.5}

    monkeypatch.setattr(programs, "impls", off)
    cfg = dataclasses.replace(TINY, lengths=(64,), peer_causal=(False,), peers=(GOOD,))
    monkeypatch.setitem(presets.PRESETS, "peers", lambda: cfg)
    assert exact.main(["--preset", "peers", "--out", str(tmp_path), "--no-progress"]) == 1
    rows = [rec["row"] for rec in _lines(tmp_path / "rows.jsonl")]
    assert [r["status"] for r in rows] == ["error", "error"] and "impls" not in rows[0]
    assert "RuntimeError: blockwise disagrees with full" in rows[0]["reason"]
    assert "exact: 2 row(s) errored" in capsys.readouterr().err
    assert "## Not measured" in (tmp_path / "table.md").read_text()


def test_the_first_call_hook_replaces_a_first_untimed_call_and_drops_what_it_refuses():
    calls = collections.Counter()

    def program(name):
        def run():
            calls[name] += 1
            return jnp.zeros(())
        return run, (), 0.0

    progs = {"a": program("a"), "b": program("b")}

    def first_call(name):
        calls[f"first {name}"] += 1
        return "refused" if name == "b" else None

    out = time_interleaved(progs, repeats=3, warmup=0, settle=1, first_call=first_call)
    assert out["b"] == {"dropped": "refused"} and len(out["a"]["times_s"]) == 3
    assert calls == {"first a": 1, "a": 5, "first b": 1}  # a: 2 settle + 3 timed calls; b: none of its own
    with pytest.raises(ValueError, match="needs warmup >= 1 or settle >= 1"):
        time_interleaved(progs, repeats=1, warmup=0, settle=0, first_call=first_call)


def test_the_preset_and_its_checks():
    cfg = presets.peers()
    assert cfg.lengths == (1024, 2048, 4096, 8192) and cfg.peer_causal == (False, True) and cfg.peers == PEERS
    assert exact_cli.default_out("kernels", cfg.preset) == Path("results/exact/peers")
    assert exact.config_from_args(exact_cli.parse_args(["--preset", "peers", "--repeats", "2"])).repeats == 2
    assert set(peers.LOADERS) == set(PEERS)
    for bad, words in [({"peers": ("flash",)}, "unknown ['flash']"), ({"warmup": 0, "peer_settle": 0}, "warmup or"),
                       ({"peer_causal": (True, True)}, "peer_causal"), ({"huge_n": 65536}, "huge_n")]:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            dataclasses.replace(cfg, **bad)


# --- the real peers (skipped unless the extra is installed) ---------------------------------

_PACKAGE = {"tokamax.xla": "tokamax", "tokamax.xla_chunked": "tokamax",
            "memory_efficient_attention": "memory_efficient_attention", "ringattention": "ringattention"}


def _require(package: str) -> None:
    """Skip unless ``package`` is installed. tokamax by ``pytest.importorskip``; the other two
    by their spec only: importing them runs the broken ``__init__`` the loaders avoid (torch;
    ``jax.lib.xla_bridge``), which importorskip would take for a missing package and skip."""
    if package == "tokamax":
        pytest.importorskip("tokamax")
    elif importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed: pip install -e '.[peers]'")


@pytest.mark.parametrize("name", PEERS)
def test_a_real_peer_loads_and_agrees_with_full(name):
    package = _PACKAGE[name]
    _require(package)
    peer = peers.load(name)
    assert peer.fn is not None, peer.note
    if name in ("memory_efficient_attention", "ringattention"):
        assert package not in sys.modules  # its package __init__ (torch; jax.lib.xla_bridge) never ran
    q, k, v = programs.inputs(256, 1, 2, 16)
    for causal in (False, True):
        def loss(fn):
            return lambda q, k, v: jnp.sum(fn(q, k, v))

        ref = full_attention(q, k, v, ea.Mask(causal=causal))
        got = jax.jit(lambda q, k, v: peer.fn(q, k, v, causal))(q, k, v)
        assert float(jnp.max(jnp.abs(got - ref))) < 1e-5, (name, causal)
        want_g = jax.grad(loss(lambda q, k, v: full_attention(q, k, v, ea.Mask(causal=causal))), (0, 1, 2))(q, k, v)
        got_g = jax.jit(jax.grad(loss(lambda q, k, v: peer.fn(q, k, v, causal)), (0, 1, 2)))(q, k, v)
        for g, w in zip(got_g, want_g):
            assert float(jnp.max(jnp.abs(g - w))) < 1e-4, (name, causal)


@pytest.mark.parametrize("name", PEERS)
def test_a_peer_not_installed_comes_back_as_its_reason(name, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == _PACKAGE[name] else real(n, *a))
    peer = peers.load(name)
    assert peer.fn is None and "is not installed" in peer.note and "pip install -e \".[peers]\"" in peer.note


def test_rows_from_the_one_round_length_take_one_round():
    """The preset's medians of ``repeats`` rounds below ``peer_one_round_from_n``, one round from it
    (where one call takes seconds); the rounds are in the row's key, so the two never mix."""
    cfg = dataclasses.replace(TINY, lengths=(64, 128), peer_one_round_from_n=128)
    assert [cfg.peer_rounds(n) for n in (64, 127, 128, 4096)] == [TINY.repeats, TINY.repeats, 1, 1]
    keys = {n: units.row_key(units.Unit("peers", n, "fwd", False), cfg) for n in (64, 128)}
    assert f"rounds={TINY.repeats}" in keys[64] and keys[128].endswith("rounds=1")
    with pytest.raises(ValueError, match="peer_one_round_from_n"):
        dataclasses.replace(TINY, peer_one_round_from_n=0)
