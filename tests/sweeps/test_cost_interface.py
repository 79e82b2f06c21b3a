"""The cost experiment's interface part (efficient_attn.sweeps.cost.interface): grouped-query
rows and packed against padded rows in the cost RowStore, their table, resumption, re-rendering."""

import dataclasses
import math

import pytest

from efficient_attn import measure, report
from efficient_attn.sweeps import cost
from efficient_attn.sweeps.cost import interface
from efficient_attn.sweeps.cost import point as cost_point
from efficient_attn.sweeps.cost import table2 as cost_table2
from efficient_attn.sweeps.cost.config import InterfaceConfig
from efficient_attn.sweeps.cost.report_interface import interface_summary
from conftest import forbid

HEADS, KV, N = 4, (4, 1), (64, 128)


def tiny(**changes):
    """Kernel sweep and interface part of blockwise at N = 64, 128, forward only, one repeat, no
    Table 2 (full's points are measured apart, forward + backward, below)."""
    base = cost.CostConfig(
        preset="test", variants=("blockwise",), lengths=N, passes=("fwd",), causal_modes=(False,), batch=1,
        heads=2, head_dim=16, warmup=1, min_repeats=1, max_repeats=1, repeat_budget_s=0.0, matmul_n=64,
        interface=InterfaceConfig(min_length=64, max_length=128, heads=HEADS, kv_heads=KV),
        table2=dataclasses.replace(cost.Table2Config(), enabled=False))
    return dataclasses.replace(base, **changes)


def _forbid_measuring(monkeypatch):
    forbid(monkeypatch, (cost_point, "measure_point"), (interface, "measure_interface_point"),
           (cost_table2, "measure_train_step"), (measure, "matmul_rate"))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One measuring run of ``tiny()``: (config, output folder, its stored rows)."""
    out = tmp_path_factory.mktemp("cost_interface")
    cfg = tiny()
    store = cost.run(cfg, out, progress=False)
    return cfg, out, store.rows()


def test_rows_carry_what_the_tables_need(measured):
    cfg, _, rows = measured
    gqa = {(r["variant"], r["n"], r["num_kv_heads"]): r for r in rows if r.get("kind") == "gqa"}
    packing = {(r["variant"], r["n"], r["layout"]): r for r in rows if r.get("kind") == "packing"}
    assert set(gqa) == {("blockwise", n, g) for n in N for g in KV}
    assert set(packing) == {("blockwise", n, lay) for n in N for lay in ("packed", "padded")}
    for r in [*gqa.values(), *packing.values()]:
        assert r["status"] == "ok", r["reason"]
        assert r["pass"] == "fwd" and r["causal"] is False and r["heads"] == HEADS
        assert r["time_median_s"] > 0 and r["compile_s"] > 0 and r["repeats"] >= 1
        assert r["memory_bytes"] >= r["temp_bytes"] >= 0
    # k and v of Hkv heads are arguments: fewer kv heads, exactly their bytes fewer (f32)
    for (v, n, g), r in gqa.items():
        kv_bytes = 2 * cfg.batch * n * (HEADS - g) * cfg.head_dim * 4
        assert gqa[v, n, HEADS]["argument_bytes"] - r["argument_bytes"] == kv_bytes
    lo, hi = cfg.interface.segment_range
    for (v, n, layout), r in packing.items():
        lens = r["segment_lengths"]
        assert sum(lens) == n and all(math.ceil(lo * n) <= x <= hi * n for x in lens)
        assert lens == packing[v, n, "packed"]["segment_lengths"]  # the same tokens in both layouts
        shape = (1, n) if layout == "packed" else (len(lens), max(lens))
        assert (r["batch"], r["seq_len"]) == shape


def test_ratios_are_computed_from_the_stored_rows(measured):
    cfg, _, rows = measured
    summary = interface_summary(rows, cfg)
    assert len(summary["gqa"]) == len(summary["packing"]) == 2  # one per N at one pass
    gqa = {(e["variant"], e["n"]): e for e in summary["gqa"]}
    for e in summary["gqa"]:
        for g in KV:
            r = e["rows"][g]
            ref = e["rows"][HEADS]
            assert e["time_ratio"][g] == pytest.approx(r["time_median_s"] / ref["time_median_s"])
            assert e["temp_ratio"][g] == pytest.approx(r["temp_bytes"] / ref["temp_bytes"])
        assert e["time_ratio"][HEADS] == 1.0
    for e in summary["packing"]:
        packed, padded = e["rows"]["packed"], e["rows"]["padded"]
        lens, n = packed["segment_lengths"], e["n"]
        assert (e["k"], e["longest"]) == (len(lens), max(lens))
        assert e["padded_over_packed_time"] == pytest.approx(padded["time_median_s"] / packed["time_median_s"])
        assert e["padded_over_packed_temp"] == pytest.approx(padded["temp_bytes"] / packed["temp_bytes"])
        unsegmented = gqa[e["variant"], n]["rows"][HEADS]  # one row of N tokens, no ids, B = 1
        assert e["packed_over_unsegmented"] == pytest.approx(packed["time_median_s"] / unsegmented["time_median_s"])
        squares = sum(x * x for x in lens)
        assert e["ideal_packed"] == pytest.approx(squares / n**2)
        # Cauchy-Schwarz: k sequences need at least 1/k of the pairs, padding at least as many as packing
        assert 1 / len(lens) <= e["ideal_packed"] <= max(lens) / n
        assert e["ideal_padded_over_packed"] == pytest.approx(len(lens) * max(lens) ** 2 / squares)
        assert e["ideal_padded_over_packed"] >= 1


def test_equal_sequences_are_packed_and_padded_with_an_ideal_of_one_kth(measured):
    """The packing_equal rows: k = equal_segments sequences of N / k, both layouts, the same
    tokens; ideal packed/unsegmented 1/k, ideal padded/packed 1; their own table section."""
    cfg, out, rows = measured
    k = cfg.interface.equal_segments
    equal = {(r["n"], r["layout"]): r for r in rows if r.get("kind") == "packing_equal"}
    assert set(equal) == {(n, lay) for n in N for lay in ("packed", "padded")}
    for (n, layout), r in equal.items():
        assert r["status"] == "ok", r["reason"]
        assert r["segment_lengths"] == [n // k] * k and r["equal_segments"] == k
        assert (r["batch"], r["seq_len"]) == ((1, n) if layout == "packed" else (k, n // k))
    summary = interface_summary(rows, cfg)
    assert len(summary["packing_equal"]) == len(N)
    for e in summary["packing_equal"]:
        assert (e["k"], e["longest"]) == (k, e["n"] // k)
        assert e["ideal_packed"] == pytest.approx(1 / k) and e["ideal_padded_over_packed"] == pytest.approx(1)
        t = e["rows"]
        assert e["padded_over_packed_time"] == pytest.approx(t["padded"]["time_median_s"] / t["packed"]["time_median_s"])
    assert f"## Packed against padded, {k} equal sequences" in (out / "table_interface.md").read_text()
    with pytest.raises(ValueError, match="equal_segments"):
        InterfaceConfig(min_length=100, equal_segments=8)


def test_table_shows_the_rows_and_the_report_only_path_rerenders_it(measured, tmp_path, monkeypatch):
    cfg, out, rows = measured
    table = (out / "table_interface.md").read_text()
    for text in ("## Grouped-query attention (H = 4", "## Packed against padded", "ms Hkv=4", "ms Hkv=1",
                 "time 1/4", "temp 1/4", "padded/packed time", "ideal packed/unsegmented"):
        assert text in table, text
    summary = interface_summary(rows, cfg)
    for e in summary["packing"]:
        cell = report.markdown_table(["x"], [[e["ideal_packed"]]]).splitlines()[-1][2:-2]
        assert f"| {e['variant']} | fwd | {e['n']} | {e['k']} | {e['longest']} |" in table
        assert f"| {cell} |" in table
    assert "Not measured" not in table
    # the report-only path, through the command line, from a copy of the stored rows only
    (tmp_path / "rows.jsonl").write_bytes((out / "rows.jsonl").read_bytes())
    (tmp_path / "rows.json").write_bytes((out / "rows.json").read_bytes())
    monkeypatch.setitem(cost.PRESETS, "quick", dataclasses.replace(cfg, preset="quick"))
    _forbid_measuring(monkeypatch)
    assert cost.main(["--preset", "quick", "--report-only", "--no-progress", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table_interface.md").read_text() == table.replace("preset `test`", "preset `quick`")


def test_a_rerun_measures_nothing_and_renders_the_same_bytes(measured, monkeypatch):
    cfg, out, _ = measured
    before = {name: (out / name).read_bytes() for name in ("rows.jsonl", "table_interface.md", "table.md")}
    _forbid_measuring(monkeypatch)
    store = cost.run(cfg, out, progress=False)
    assert interface.pending(cfg, list(cfg.variants), store) == 0
    for name, data in before.items():
        assert (out / name).read_bytes() == data, name


def test_forward_backward_points_of_the_dense_reference_are_measured():
    cfg = tiny(variants=("full",), passes=("fwd_bwd",))
    for p in (interface.Point("gqa", "full", "fwd_bwd", 64, 1),
              interface.Point("packing", "full", "fwd_bwd", 64, "packed")):
        r = interface.measure_interface_point(p, cfg)
        assert r["status"] == "ok" and r["time_median_s"] > 0 and r["temp_bytes"] > 0, (p, r["reason"])


def test_deadline_skips_with_the_reason_and_leaves_the_points_pending(tmp_path):
    cfg = tiny(variants=("blockwise",), lengths=(64,))
    cfg = dataclasses.replace(cfg, interface=dataclasses.replace(cfg.interface, budget_s=0.0))
    store = report.RowStore(tmp_path / "rows.jsonl")
    interface.run_interface(cfg, ["blockwise"], store, progress=False)
    rows = store.rows()
    # two kv counts, two layouts of the seeded lengths, two of the equal sequences
    assert len(rows) == 6 and all(r["status"] == "skipped" and r["reason"].startswith("sweep budget") for r in rows)
    assert interface.pending(cfg, ["blockwise"], store) == 6  # a rerun resumes them
    cost.write_outputs(tmp_path, rows, cfg, None)
    table = (tmp_path / "table_interface.md").read_text()
    assert "6 points not reached within the interface part's time budget" in table


def test_a_bad_point_is_an_error_row_not_an_exception():
    # lengths of exactly 0.3 N cannot sum to N = 64
    cfg = tiny()
    cfg = dataclasses.replace(cfg, interface=dataclasses.replace(cfg.interface, segment_range=(0.3, 0.3)))
    r = interface.measure_interface_point(interface.Point("packing", "full", "fwd", 64, "packed"), cfg)
    assert r["status"] == "error" and "no count of sequences" in r["reason"] and "segment_range" in r["reason"]


def test_segment_lengths_are_seeded_bounded_and_sum_to_n():
    cfg = tiny()
    for n in (64, 1000, 4096):
        lens = interface.segment_lengths(n, cfg)
        assert sum(lens) == n and all(n / 16 <= x <= n / 4 for x in lens)
        assert interface.segment_lengths(n, cfg) == lens
    draws = {tuple(interface.segment_lengths(4096, dataclasses.replace(cfg, seed=s))) for s in range(5)}
    assert len(draws) > 1


def test_points_follow_the_length_range_the_capabilities_and_the_switch():
    cfg = tiny()
    # the default range (1K and up) leaves a sweep of short lengths without interface points
    assert interface.points(dataclasses.replace(cfg, interface=InterfaceConfig()), ["full", "blockwise"]) == []
    assert interface.points(cfg, ["linformer"]) == []  # not an exact baseline
    assert {p.n for p in interface.points(dataclasses.replace(cfg, lengths=(32, 64, 256)), ["full"])} == {64}
    args = cost.parse_args(["--no-interface"])
    assert cost.config_from_args(args).interface.enabled is False
    assert interface.points(dataclasses.replace(cfg, interface=dataclasses.replace(cfg.interface, enabled=False)),
                            ["full"]) == []


def test_config_names_the_bad_value():
    with pytest.raises(ValueError, match="kv_heads must be positive divisors of heads=8"):
        InterfaceConfig(kv_heads=(8, 3))
    with pytest.raises(ValueError, match="segment_range"):
        InterfaceConfig(segment_range=(0.5, 0.25))
    with pytest.raises(ValueError, match="min_length <= max_length"):
        InterfaceConfig(min_length=4096, max_length=1024)
