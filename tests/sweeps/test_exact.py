"""The exact experiment (efficient_attn/sweeps/exact/): rows into the RowStore, tables from the
stored rows only, resumption, errors, and the command lines of both parts.

One tiny run (N = 64, 128; one round) is measured for the whole module; the other tests
copy its folder and re-run on it, so that they compile only what they redo.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from efficient_attn.sweeps import exact, reproduce
from efficient_attn.sweeps.exact import cli as exact_cli
from efficient_attn.sweeps.exact import encoder, presets, units
from efficient_attn.sweeps.exact.config import IMPLS, EncoderBenchConfig, ExactConfig

TINY = ExactConfig(preset="quick", lengths=(64, 128), batch=1, heads=2, head_dim=8, repeats=1, memory_n=64,
                   causal_n=64, matmul_n=64)
KINDS = [("time", 64, "fwd"), ("time", 64, "fwd_bwd"), ("time", 128, "fwd"), ("time", 128, "fwd_bwd"),
         ("memory", 64, "fwd_bwd"), ("causal", 64, "fwd")]


_REAL_MEASURE = units.measure_unit


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``main`` at the tiny preset: (its folder, exit status, the table's bytes)."""
    out = tmp_path_factory.mktemp("exact")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(presets.PRESETS, "quick", lambda: TINY)
        rc = exact.main(["--out", str(out), "--no-progress"])
    return out, rc, (out / "table.md").read_bytes()


@pytest.fixture
def copy_of(tiny_run, tmp_path, monkeypatch):
    """A copy of the tiny run's folder, with the tiny preset in place for this test."""
    monkeypatch.setitem(presets.PRESETS, "quick", lambda: TINY)
    dst = tmp_path / "run"
    shutil.copytree(tiny_run[0], dst)
    return dst


def _recording(monkeypatch, fail: str | None = None) -> list:
    """Wrap the measuring of one unit: record what is measured, optionally fail one kind."""
    seen = []

    def measure(unit, cfg):
        seen.append((unit.kind, unit.n, unit.pass_name))
        if unit.kind == fail:
            raise RuntimeError("broken on purpose")
        return _REAL_MEASURE(unit, cfg)

    monkeypatch.setattr(units, "measure_unit", measure)
    return seen


def test_one_row_per_unit_holding_every_implementation_timed_together(tiny_run):
    out, rc, table = tiny_run
    assert rc == 0
    stored = _lines(out / "rows.jsonl")
    assert [(r["row"]["kind"], r["row"]["n"], r["row"]["pass"]) for r in stored] == KINDS
    for rec in stored:
        row = rec["row"]
        assert row["status"] == "ok" and row["environment"]["commit"]
        if row["kind"] == "time":
            assert set(row["impls"]) == set(IMPLS)
            for t in [*row["impls"].values(), row["matmul"]]:
                assert len(t["times_s"]) == TINY.repeats and t["median_s"] > 0
            bw = row["impls"]["blockwise"]
            # the fraction of the matmul rate is of the rate measured in the same rounds
            rate = row["matmul"]["flops"] / row["matmul"]["median_s"]
            assert bw["matmul_fraction"] == pytest.approx(row["flops"] / bw["median_s"] / rate)
    text = table.decode()
    for n in (64, 128):
        assert text.count(f"\n| {n} | ") == 2 + (n == 64) * 2  # fwd, fwd_bwd (+ 2 memory rows at 64)
    assert "## forward + backward" in text and "Causal blockwise forward at N=64" in text
    assert json.loads((out / "rows.json").read_text())["config"]["lengths"] == [64, 128]


def test_report_only_renders_the_stored_rows_and_measures_nothing(copy_of, tiny_run, monkeypatch):
    seen = _recording(monkeypatch, fail="time")
    rows_json = (copy_of / "rows.json").read_bytes()
    (copy_of / "table.md").unlink()
    assert exact.main(["--out", str(copy_of), "--report-only"]) == 0
    assert seen == []
    assert (copy_of / "table.md").read_bytes() == tiny_run[2]
    assert (copy_of / "rows.json").read_bytes() == rows_json


def test_a_killed_run_resumes_without_redoing_finished_rows(copy_of, monkeypatch):
    store = copy_of / "rows.jsonl"
    lines = store.read_bytes().split(b"\n")
    kept = lines[:5]  # the run died while appending the causal row: half of its line is on disk
    store.write_bytes(b"\n".join(kept) + b"\n" + lines[5][: len(lines[5]) // 2])
    seen = _recording(monkeypatch)
    assert exact.main(["--out", str(copy_of)]) == 0
    assert seen == KINDS[5:]
    after = _lines(store)
    assert [json.loads(line) for line in kept] == after[:5]  # finished rows untouched
    assert len(after) == 6 and after[5]["row"]["kind"] == "causal" and after[5]["row"]["status"] == "ok"
    assert "Causal blockwise forward at N=64" in (copy_of / "table.md").read_text()


def test_an_errored_row_is_recorded_gives_exit_1_and_is_retried(copy_of, monkeypatch, capsys):
    store = copy_of / "rows.jsonl"
    store.write_text("".join(line + "\n" for line in store.read_text().splitlines()[:-1]))  # no causal row
    seen = _recording(monkeypatch, fail="causal")
    assert exact.main(["--out", str(copy_of)]) == 1
    assert seen == [("causal", 64, "fwd")]
    err = capsys.readouterr().err
    assert "exact: 1 row(s) errored" in err and "n=64 pass=fwd: RuntimeError: broken on purpose" in err
    table = (copy_of / "table.md").read_text()
    assert "## Not measured" in table and "| causal | 64 | fwd | error | RuntimeError: broken on purpose |" in table
    assert "## forward" in table  # the other rows are still reported
    assert _lines(store)[-1]["row"]["status"] == "error"
    assert exact.main(["--out", str(copy_of)]) == 1  # a rerun tries the errored row again, only it
    assert seen == [("causal", 64, "fwd")] * 2


@pytest.mark.parametrize("main, argv, flag", [
    (exact.main, ["--lengths", "0"], "--lengths"),
    (exact.main, ["--lengths", "64", "x"], "--lengths"),
    (exact.main, ["--repeats", "0"], "--repeats"),
    (exact.main, ["--variants", "full"], "--variants"),
    (exact.main, ["--report-only", "--force"], "--report-only"),
    (exact.main, ["--preset", "lra"], "--preset"),
    (exact.encoder_main, ["--out", "results/exact/encoder.json"], "--out"),
    (exact.encoder_main, ["--emb", "30", "--heads", "4"], "emb=30"),
])
def test_bad_flags_are_one_line_naming_the_flag(main, argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], lines


def test_earlier_flags_still_mean_what_they_meant():
    args = exact_cli.parse_args(["--huge", "--lengths", "1024", "2048,4096", "--memory-n", "4096"])
    cfg = exact.config_from_args(args)
    assert cfg == dataclasses.replace(presets.huge(), lengths=(1024, 2048, 4096), memory_n=4096)
    assert cfg.huge_n == 65536 and exact_cli.default_out("kernels", cfg.preset) == Path("results/exact/huge")
    assert exact_cli.default_out("kernels", "quick") == Path("results/exact")
    assert presets.PRESETS["quick"]() == presets.quick() and presets.quick().huge_n is None


@pytest.mark.parametrize("preset, kernels", [("quick", "quick"), ("cpu", "huge"), ("lra", "huge")])
def test_reproduce_runs_the_kernels_into_results_exact(preset, kernels):
    args = exact_cli.parse_args(reproduce._experiment_args("exact", preset, Path("res"), True, []))
    assert (args.preset, args.out, args.force) == (kernels, Path("res/exact"), True)


@pytest.mark.slow  # three small models' training steps compiled: ~10 s of the 2-core CPU
def test_the_encoder_row_times_three_models_together_and_is_reused(tmp_path, monkeypatch):
    tiny = EncoderBenchConfig(length=16, batch=2, layers=1, emb=8, heads=2, repeats=1)
    monkeypatch.setitem(presets.ENCODER_PRESETS, "quick", lambda: tiny)
    assert exact.encoder_main(["--out", str(tmp_path)]) == 0
    (rec,) = _lines(tmp_path / "rows.jsonl")
    assert rec["row"]["status"] == "ok" and set(rec["row"]["models"]) == {"flax_nnx_mha", "full", "full_einsum"}
    for m in rec["row"]["models"].values():
        assert m["train_tokens_per_s"] == pytest.approx(2 * 16 / m["train"]["median_s"])
        assert len(m["train"]["times_s"]) == len(m["fwd"]["times_s"]) == 1
    table = (tmp_path / "table.md").read_bytes()
    assert b"| flax.nnx.MultiHeadAttention |" in table and b"| full (fast_exact: blockwise kernel) |" in table
    monkeypatch.setattr(encoder, "measure_row", _never)
    assert exact.encoder_main(["--out", str(tmp_path)]) == 0  # the stored row is reused
    assert (tmp_path / "table.md").read_bytes() == table


def _never(cfg):
    raise AssertionError("measured although a finished row is stored")


def test_the_encoder_table_comes_from_the_stored_row_and_an_error_exits_1(tmp_path, monkeypatch, capsys):
    """The encoder's run and report around its measurement (a failing one here: no compile)."""
    tiny = EncoderBenchConfig(length=16, batch=2, layers=1, emb=8, heads=2, repeats=1)
    monkeypatch.setitem(presets.ENCODER_PRESETS, "quick", lambda: tiny)

    def broken(cfg):
        raise MemoryError("out of memory on purpose")

    monkeypatch.setattr(encoder, "measure_row", broken)
    assert exact.encoder_main(["--out", str(tmp_path)]) == 1
    assert "exact encoder: 1 row(s) errored" in capsys.readouterr().err
    (rec,) = _lines(tmp_path / "rows.jsonl")
    assert rec["row"]["status"] == "error" and rec["row"]["reason"] == "MemoryError: out of memory on purpose"
    table = (tmp_path / "table.md").read_bytes()
    assert b"Not measured: error: MemoryError: out of memory on purpose" in table
    monkeypatch.setattr(encoder, "measure_row", _never)
    (tmp_path / "table.md").unlink()
    assert exact.encoder_main(["--out", str(tmp_path), "--report-only"]) == 1  # the stored error still counts
    assert (tmp_path / "table.md").read_bytes() == table
