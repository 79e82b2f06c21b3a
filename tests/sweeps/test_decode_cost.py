"""The decode-cost sweep (efficient_attn.sweeps.decode_cost): outputs, resumption, re-rendering,
budgets, the analysis of stored rows, the command line, and its place in ``make reproduce``.

Measured at tiny contexts only (timings there mean nothing; the tests check structure and
the exact quantities: state bytes, slopes of state size, skips, what is re-measured)."""

import csv
import dataclasses
import json
import shutil

import pytest

import efficient_attn as ea
from efficient_attn.sweeps import decode_cost, reproduce
from efficient_attn.sweeps.decode_cost import analysis, growth, point
from efficient_attn.sweeps.decode_cost.run import rows_of, select_variants
from efficient_attn import results_index
from conftest import forbid

DECODERS = [n for n in ea.list_variants() if ea.get_spec(n).capabilities.decode]
BASE = decode_cost.baseline()


def _fixed_state_variant():
    """A decoding variant whose state does not grow with the context (found from its shapes)."""
    cfg = _tiny()
    for name in DECODERS:
        if name != BASE and point.state_bytes(name, 1, 32, cfg) == point.state_bytes(name, 1, 64, cfg):
            return name
    pytest.skip("no fixed-state decoding variant registered")


def _tiny(**changes):
    cfg = decode_cost.DecodeCostConfig(preset="test", variants=(BASE,), contexts=(32, 64), batches=(1, 2), heads=2,
                                       head_dim=8, steps_per_call=2, warmup=0, min_repeats=1, max_repeats=1,
                                       repeat_budget_s=0.0, max_step_s=60.0, growth_rounds=3)
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One tiny sweep of the baseline and a fixed-state variant, shared by the tests below."""
    out = tmp_path_factory.mktemp("decode_cost")
    cfg = _tiny(variants=(BASE, _fixed_state_variant()))
    store = decode_cost.run(cfg, out, progress=False)
    return cfg, out, store


def test_every_point_measured_and_written(swept):
    cfg, out, store = swept
    rows = rows_of(cfg, store)
    assert len(rows) == len(cfg.variants) * 2 * 2
    assert all(r["status"] == "ok" and r["step_median_s"] > 0 and r["state_bytes"] > 0 for r in rows)
    for f in ("table.md", "rows.csv", "rows.json", "decode.png"):
        assert (out / f).exists(), f
    table = (out / "table.md").read_text()
    for batch in cfg.batches:
        assert f"## Step latency (ms per token), batch {batch}" in table
        assert f"## State memory (MiB), batch {batch}" in table
    with open(out / "rows.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    data = json.loads((out / "rows.json").read_text())
    assert data["config"]["contexts"] == [32, 64] and data["environment"]["preset"] == "test"


def test_fixed_state_growth_is_measured_interleaved_and_drives_the_goal(swept):
    """One growth row per fixed-state (variant, batch): the same program on the shortest and the
    longest context's state in interleaved rounds; the KV cache (state grows) gets none; the
    goal lines use the interleaved ratio and say so."""
    cfg, out, store = swept
    fixed = cfg.variants[1]
    rows = decode_cost.growth_rows_of(cfg, store)
    assert {(r["variant"], r["batch"]) for r in rows} == {(fixed, b) for b in cfg.batches}
    for r in rows:
        assert r["status"] == "ok", r.get("reason")
        assert (r["shortest"], r["longest"], r["rounds"]) == (32, 64, cfg.growth_rounds)
        assert r["step_shortest_s"] > 0 and r["growth"] == pytest.approx(r["step_longest_s"] / r["step_shortest_s"])
    table = (out / "table.md").read_text()
    assert "Growth of the fixed-state step, batch 1" in table
    assert f"- {fixed}: step growth {rows[0]['growth']:.2f}x over 32-64 (interleaved)" in table
    assert json.loads((out / "rows.json").read_text())["growth_rows"][0]["variant"] == fixed
    with pytest.raises(ValueError, match="growth_rounds"):
        _tiny(growth_rounds=-1)
    assert decode_cost.growth_rows_of(_tiny(variants=(fixed,), growth_rounds=0), store) == []


def test_state_sizes_are_exact_and_only_the_cache_grows(swept):
    cfg, _, store = swept
    rows = rows_of(cfg, store)
    by = {(r["variant"], r["batch"], r["context"]): r for r in rows}
    fixed = cfg.variants[1]
    # the KV cache: keys and values of heads x head_dim floats per slot, plus a bool per slot
    per_slot = 2 * cfg.heads * cfg.head_dim * 4 + 1
    for b in cfg.batches:
        for n in cfg.contexts:
            assert by[(BASE, b, n)]["state_bytes"] == b * (n + cfg.steps_per_call) * per_slot + 4
        assert by[(fixed, b, 32)]["state_bytes"] == by[(fixed, b, 64)]["state_bytes"]
        assert by[(BASE, 2, 64)]["state_bytes"] - 4 == 2 * (by[(BASE, 1, 64)]["state_bytes"] - 4)
    summaries = {(s.variant, s.batch): s for s in analysis.summarise(rows, BASE)}
    assert summaries[(BASE, 1)].state == "grows" and summaries[(fixed, 1)].state == "fixed"
    assert summaries[(fixed, 1)].memory_slope.slope == pytest.approx(0.0, abs=1e-9)
    assert 0.8 < summaries[(BASE, 1)].memory_slope.slope <= 1.0


def test_rerun_measures_nothing_and_report_only_rerenders_the_same(swept, monkeypatch):
    cfg, out, _ = swept
    table = (out / "table.md").read_text()

    forbid(monkeypatch, (point, "measure_point"), (growth, "measure_growth"))
    decode_cost.run(cfg, out, progress=False)
    decode_cost.run(cfg, out, progress=False, report_only=True)
    assert (out / "table.md").read_text() == table


def test_force_on_a_subset_keeps_the_other_rows(swept, tmp_path, monkeypatch):
    """``--force --variants X`` measures X's points (and growth rows) again, keeps the others'."""
    cfg, out, store = swept
    shutil.copytree(out, tmp_path / "run")
    fixed = cfg.variants[1]
    measured = []
    real_point, real_growth = point.measure_point, growth.measure_growth
    monkeypatch.setattr(point, "measure_point", lambda name, *a: measured.append(name) or real_point(name, *a))
    monkeypatch.setattr(growth, "measure_growth", lambda name, *a: measured.append(name) or real_growth(name, *a))
    again = decode_cost.run(dataclasses.replace(cfg, variants=(fixed,)), tmp_path / "run", force=True, progress=False)
    assert measured and set(measured) == {fixed}
    kept = [r for r in rows_of(cfg, again) if r["variant"] == BASE]
    assert kept and kept == [r for r in rows_of(cfg, store) if r["variant"] == BASE]


def test_time_and_memory_budgets_skip_and_keep_state_size(tmp_path):
    cfg = _tiny(max_step_s=1e-12)
    rows = rows_of(cfg, decode_cost.run(cfg, tmp_path, progress=False))
    first = [r for r in rows if r["context"] == 32]
    later = [r for r in rows if r["context"] == 64]
    assert all(r["status"] == "ok" for r in first), "the shortest context is measured (nothing to predict from)"
    assert all(r["status"] == "skipped" and r["reason"].startswith("time budget") for r in later)
    assert all(r["state_bytes"] > 0 for r in later)
    cfg = _tiny(memory_budget_bytes=1)
    rows = rows_of(cfg, decode_cost.run(cfg, tmp_path / "m", progress=False))
    assert all(r["status"] == "skipped" and r["reason"].startswith("memory budget") for r in rows)
    assert "## Not measured" in (tmp_path / "m" / "table.md").read_text()


def _row(variant, batch, n, t, b=100):
    return {"variant": variant, "batch": batch, "context": n, "status": "ok", "step_median_s": t, "state_bytes": b}


def test_analysis_slopes_speedups_and_crossover_from_rows():
    ns = (1024, 4096, 16384)
    rows = [_row("base", 1, n, 1e-6 * n, b=n) for n in ns]  # linear in the context
    rows += [_row("flat", 1, n, 2e-3) for n in ns]  # constant: slower at 1K, faster from 4K
    s = {x.variant: x for x in analysis.summarise(rows, "base")}
    assert s["base"].slope.slope == pytest.approx(1.0) and s["base"].state == "grows"
    assert s["flat"].slope.slope == pytest.approx(0.0, abs=1e-12) and s["flat"].state == "fixed"
    assert s["flat"].growth == pytest.approx(1.0) and s["flat"].growth_span == (1024, 16384)
    assert s["flat"].speedup == pytest.approx(1e-6 * 16384 / 2e-3) and s["flat"].speedup_at == 16384
    assert s["flat"].crossover.n == 4096 and 1024 < s["flat"].crossover.n_interp < 4096
    assert s["base"].speedup is None


def test_cli_refuses_bad_flags(capsys):
    refusers = [n for n in ea.list_variants() if not ea.get_spec(n).capabilities.decode]
    for argv in (["--lengths", "0"], ["--batches", "x"], ["--preset", "nosuch"],
                 ["--report-only", "--force"], *([["--variants", refusers[0]]] if refusers else [])):
        with pytest.raises(SystemExit) as e:
            decode_cost.main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and len(err.strip().splitlines()) == 1, err


def test_cli_tiny_run(tmp_path, monkeypatch):
    monkeypatch.setitem(decode_cost.PRESETS, "quick", _tiny(preset="quick"))
    argv = ["--variants", BASE, "--lengths", "32", "--batches", "1", "--steps", "2", "--no-progress",
            "--out", str(tmp_path)]
    assert decode_cost.main(argv) == 0
    assert "| " + BASE + " |" in (tmp_path / "table.md").read_text()


def test_presets_and_reproduce():
    quick, cpu = decode_cost.PRESETS["quick"], decode_cost.PRESETS["cpu"]
    assert max(quick.contexts) == 16384 and min(quick.contexts) == 1024 and quick.batches == (1, 8)
    assert (min(cpu.contexts), max(cpu.contexts)) == (1024, 65536) and cpu.batches == (1, 8)
    assert "decode_cost" in dict(reproduce.EXPERIMENTS)
    assert any(rel.startswith("decode_cost/") for _, rel, *_ in results_index.SECTIONS)
    assert set(select_variants(dataclasses.replace(quick, variants=None))) == set(DECODERS)
