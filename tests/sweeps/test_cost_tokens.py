"""The cost experiment's fixed-token control (efficient_attn.sweeps.cost.tokens): its points,
rows, table and resumption."""

import dataclasses

import pytest

from efficient_attn import report
from efficient_attn.sweeps import cost
from efficient_attn.sweeps.cost import point as cost_point
from efficient_attn.sweeps.cost import tokens
from efficient_attn.sweeps.cost.config import InterfaceConfig, TokensConfig
from efficient_attn.sweeps.cost.report_tokens import fixed_token_slope
from conftest import forbid

TOKENS, SHORT = 128, 32


def tiny(**changes):
    base = cost.CostConfig(
        preset="test", variants=("full", "linear", "local"), lengths=(SHORT, TOKENS), passes=("fwd",),
        causal_modes=(False,), batch=1, heads=2, head_dim=16, warmup=1, min_repeats=1, max_repeats=1,
        repeat_budget_s=0.0, matmul_n=64,
        interface=dataclasses.replace(InterfaceConfig(), enabled=False),
        tokens=TokensConfig(tokens=TOKENS, lengths=(SHORT,), passes=("fwd",)),
        table2=dataclasses.replace(cost.Table2Config(), enabled=False))
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost_tokens")
    cfg = tiny()
    store = cost.run(cfg, out, progress=False)
    return cfg, out, store.rows()


def test_points_are_the_subquadratic_variants_at_fixed_tokens():
    cfg = tiny()
    assert tokens.points(cfg, cfg.variants) == [("linear", "fwd", False, SHORT, TOKENS // SHORT),
                                                ("local", "fwd", False, SHORT, TOKENS // SHORT)]
    # without the kernel sweep's own N = tokens point there is no last column: no control
    assert tokens.points(tiny(lengths=(SHORT,)), cfg.variants) == []


def test_rows_hold_the_same_number_of_tokens(measured):
    _, _, rows = measured
    mine = [r for r in rows if r.get("kind") == "tokens"]
    assert sorted(r["variant"] for r in mine) == ["linear", "local"]
    for r in mine:
        assert r["status"] == "ok", r["reason"]
        assert r["batch"] * r["n"] == TOKENS and r["time_median_s"] > 0


def test_table_gives_both_slopes_and_the_claim(measured):
    _, out, _ = measured
    table = (out / "table_tokens.md").read_text()
    assert f"| variant | claims | B={TOKENS // SHORT} N={SHORT} | B=1 N={TOKENS} | fixed-token slope |" in table
    assert "| linear | O(N d^2) |" in table and "| full |" not in table  # quadratic: not in the control
    line = next(x for x in table.splitlines() if x.startswith("| local |"))
    assert line.rstrip().endswith("| 0 |")  # claimed - 1 for O(N w)


def test_a_rerun_measures_nothing(measured, monkeypatch):
    cfg, out, _ = measured
    before = (out / "rows.jsonl").read_bytes()
    forbid(monkeypatch, (cost_point, "measure_point"))
    cost.run(cfg, out, progress=False)
    assert (out / "rows.jsonl").read_bytes() == before


def test_fixed_token_slope_recovers_the_exponent():
    assert fixed_token_slope([(n, 3.0 * n**0.5) for n in (1024, 4096, 16384)]) == pytest.approx(0.5)
    assert fixed_token_slope([(1024, 1.0)]) is None


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="divide tokens"):
        TokensConfig(tokens=1000, lengths=(300,))
    with pytest.raises(ValueError, match="passes"):
        TokensConfig(passes=("train",))


def test_a_point_whose_batch_one_twin_was_skipped_is_skipped(tmp_path, monkeypatch):
    cfg = tiny(variants=("linear",))
    store = report.RowStore(tmp_path / "rows.jsonl")
    twin = dict(cost_point.base_row("linear", "fwd", False, TOKENS, cfg), status="skipped",
                reason="memory budget: compiled program needs 9 MiB")
    store.add(tokens.kernel_key("linear", "fwd", False, cfg), twin)
    forbid(monkeypatch, (cost_point, "measure_point"))
    tokens.run_tokens(cfg, cfg.variants, store, None, progress=False)
    (row,) = [r for r in store.rows() if r.get("kind") == "tokens"]
    assert row["status"] == "skipped" and "memory budget" in row["reason"] and row["batch"] == TOKENS // SHORT
