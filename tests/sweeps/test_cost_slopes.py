"""The cost experiment's interleaved slope check (efficient_attn.sweeps.cost.slopes): which series
it times, in which order, what it stores and renders, and that a rerun measures nothing."""

import dataclasses

import pytest

from efficient_attn import measure, report
from efficient_attn.sweeps import cost
from efficient_attn.sweeps.cost import point as cost_point
from efficient_attn.sweeps.cost import slopes
from efficient_attn.sweeps.exact import timing
from conftest import forbid


def tiny(**changes):
    return dataclasses.replace(
        cost.CostConfig(preset="test", variants=("full", "linear"), lengths=(64, 128), passes=("fwd",),
                        causal_modes=(False,), heads=2, head_dim=16, min_repeats=1, max_repeats=2,
                        repeat_budget_s=0.01, matmul_n=128,
                        table2=dataclasses.replace(cost.Table2Config(), enabled=False),
                        slopes=cost.SlopesConfig(enabled=True, lengths=(64, 128), rounds=2)),
        **changes)


def test_only_linear_time_claims_are_checked_each_masking_where_the_variant_has_it():
    cfg = tiny(variants=("full", "linear", "deltanet"), causal_modes=(False, True))
    assert slopes.points(cfg, cfg.variants) == [("linear", "fwd", False), ("linear", "fwd", True),
                                                ("deltanet", "fwd", True)]


def test_every_length_is_timed_in_the_same_rounds_after_a_warm_up_of_each(monkeypatch):
    """One call of the shared interleaved timer (exact.timing: warm-up of each program, then rounds
    of one call each) over the programs of every length, ``rounds`` rounds."""
    seen = []

    def spy(programs, *, repeats, warmup, settle):
        seen.append((sorted(programs), repeats, warmup))
        return timing.time_interleaved(programs, repeats=repeats, warmup=warmup, settle=settle)

    monkeypatch.setattr(slopes, "time_interleaved", spy)
    row = slopes.measure_series("linear", "fwd", False, tiny())
    assert seen == [(["N=128", "N=64"], 2, 1)]
    assert row["status"] == "ok" and len(row["medians_s"]) == 2


def test_a_run_stores_one_row_per_series_renders_it_and_a_rerun_measures_nothing(tmp_path, monkeypatch):
    cfg = tiny()
    cost.run(cfg, tmp_path, progress=False)
    store = report.RowStore(tmp_path / "rows.jsonl")
    [row] = [r for r in store.rows() if r.get("kind") == "slopes"]
    assert row["variant"] == "linear" and row["status"] == "ok" and row["lengths"] == [64, 128]
    assert len(row["medians_s"]) == 2 and all(t > 0 for t in row["medians_s"])
    fit = measure.fit_loglog(row["lengths"], row["medians_s"])
    assert row["slope"] == pytest.approx(fit.slope)
    table = (tmp_path / "table_slopes.md").read_text()
    assert "| linear |" in table and "| full |" not in table and "N=64" in table and "sweep slope" in table
    before = (tmp_path / "rows.jsonl").read_bytes()
    forbid(monkeypatch, (slopes, "measure_series"), (cost_point, "measure_point"), (measure, "matmul_rate"))
    cost.run(cfg, tmp_path, progress=False)
    assert (tmp_path / "rows.jsonl").read_bytes() == before


def test_a_series_whose_sweep_point_was_skipped_is_skipped_with_the_reason(tmp_path, monkeypatch):
    cfg = tiny(variants=("linear",))
    store = report.RowStore(tmp_path / "rows.jsonl")
    skipped = dict(cost_point.base_row("linear", "fwd", False, 128, cfg), status="skipped",
                   reason="memory budget: test")
    store.add(cost_point.row_key("cost", "linear", "fwd", False, 128, cfg), skipped)
    forbid(monkeypatch, (slopes, "measure_series"))
    slopes.run_slopes(cfg, ["linear"], store, progress=False)
    [row] = [r for r in store.rows() if r.get("kind") == "slopes"]
    assert row["status"] == "skipped" and "N=128" in row["reason"] and "memory budget: test" in row["reason"]


def test_a_run_narrowed_to_other_lengths_has_no_check():
    cfg = tiny(lengths=(32, 64))
    assert slopes.points(cfg, cfg.variants) == []
