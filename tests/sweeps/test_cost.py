"""The cost sweep (efficient_attn.sweeps.cost): outputs, resumption, re-rendering, budgets,
errors, interruption, the registry's baselines and the command line."""

import csv
import dataclasses
import json

import jax.numpy as jnp
import pytest

import efficient_attn as ea
from efficient_attn import measure, report
from efficient_attn.registry import unregister
from efficient_attn.sweeps import cost, cost_report
from efficient_attn.sweeps.cost import point as cost_point
from efficient_attn.sweeps.cost import table2 as cost_table2
from efficient_attn.sweeps.cost.budgets import Budgets
from efficient_attn.sweeps.cost.run import points
from conftest import forbid

TINY = dict(
    lengths=(64, 128),
    causal_modes=(False,),
    batch=1,
    heads=2,
    head_dim=16,
    warmup=1,
    min_repeats=1,
    max_repeats=2,
    repeat_budget_s=0.01,
    matmul_n=128,
)
ARGV = ["--variants", "full,blockwise", "--lengths", "64,128", "--no-table2", "--no-progress",
        "--heads", "2", "--head-dim", "16", "--batch", "1"]


def tiny(**changes):
    t2 = dataclasses.replace(cost.Table2Config(), enabled=False)
    return dataclasses.replace(cost.CostConfig(preset="test", variants=("full", "blockwise"), table2=t2, **TINY),
                               **changes)


def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture
def small_quick(monkeypatch):
    """The quick preset's budgets at a small matmul, without the deadline and the causal mode."""
    monkeypatch.setitem(cost.PRESETS, "quick", dataclasses.replace(cost.PRESETS["quick"], causal_modes=(False,),
                                                                   matmul_n=128, sweep_budget_s=None))


def _no_measuring(monkeypatch):
    forbid(monkeypatch, (cost_point, "measure_point"), (cost_table2, "measure_train_step"), (measure, "matmul_rate"))


def test_tiny_sweep_writes_every_output_and_a_rerun_skips_finished_rows(tmp_path, monkeypatch, small_quick):
    argv = ARGV + ["--out", str(tmp_path)]
    assert cost.main(argv) == 0
    for name in ("table.md", "rows.csv", "rows.json", "rows.jsonl", "time.png", "memory.png"):
        assert (tmp_path / name).stat().st_size > 0, name

    rows = _csv_rows(tmp_path / "rows.csv")
    assert len(rows) == 2 * 2 * 2  # variants x lengths x passes
    assert {(r["variant"], r["n"], r["pass"]) for r in rows} == {
        (v, n, p) for v in ("full", "blockwise") for n in ("64", "128") for p in ("fwd", "fwd_bwd")}
    for r in rows:
        assert r["status"] == "ok", r["reason"]
        assert r["causal"] == "False"
        assert 0 < float(r["time_median_s"]) < 10 and float(r["time_spread"]) >= 0
        assert float(r["compile_s"]) > 0
        assert int(r["memory_bytes"]) >= int(r["temp_bytes"]) >= 0
        assert float(r["flops"]) > 0 and r["flops_source"] in ("xla", "jaxpr", "jaxpr_inexact")
    # full's quadratic score matrix: memory grows with N
    mem = {(r["variant"], int(r["n"]), r["pass"]): int(r["memory_bytes"]) for r in rows}
    assert mem["full", 128, "fwd"] > mem["full", 64, "fwd"]

    doc = json.loads((tmp_path / "rows.json").read_text())
    assert doc["environment"]["preset"] == "quick" and doc["environment"]["matmul_gflops"] > 0
    assert len(doc["rows"]) == 8
    table = (tmp_path / "table.md").read_text()
    for text in ("Forward, bidirectional", "Forward + backward, bidirectional", "| full |", "| blockwise |",
                 "vs full / vs blockwise", "Crossover N", "N=64", "N=128", "## Notes"):
        assert text in table, text

    # rerun: nothing is measured again, not even the matmul ceiling, and the tables come out
    # byte for byte as the measuring run wrote them (its ceiling and load averages kept)
    before = {name: (tmp_path / name).read_bytes() for name in ("table.md", "rows.csv", "rows.jsonl")}
    _no_measuring(monkeypatch)
    assert cost.main(argv) == 0
    assert len(_csv_rows(tmp_path / "rows.csv")) == 8
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data, name
    after = json.loads((tmp_path / "rows.json").read_text())["environment"]
    assert after["matmul_gflops"] == doc["environment"]["matmul_gflops"]


def test_report_only_measures_nothing_and_leaves_pending_points_pending(tmp_path, monkeypatch):
    cfg = tiny(variants=("full",), lengths=(64,), passes=("fwd",))
    cost.run(cfg, tmp_path, progress=False)
    table = (tmp_path / "table.md").read_bytes()
    _no_measuring(monkeypatch)
    longer = dataclasses.replace(cfg, lengths=(64, 128))  # N=128 is pending: not measured, not stored
    store = cost.run(longer, tmp_path, progress=False, report_only=True)
    assert [(r["n"], r["status"]) for r in store.rows()] == [(64, "ok")]
    assert (tmp_path / "table.md").read_bytes() == table
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="report_only"):
        cost.run(cfg, tmp_path, force=True, report_only=True)


def test_force_measures_again(tmp_path, monkeypatch):
    cfg = tiny(variants=("full",), lengths=(64,), passes=("fwd",))
    cost.run(cfg, tmp_path, progress=False)
    seen = []
    real = cost_point.measure_point

    def spy(*a, **k):
        seen.append(a[:4])
        return real(*a, **k)

    monkeypatch.setattr(cost_point, "measure_point", spy)
    cost.run(cfg, tmp_path, progress=False)
    assert seen == []
    cost.run(cfg, tmp_path, force=True, progress=False)
    assert seen == [("full", "fwd", False, 64)]


def test_force_on_a_subset_keeps_the_other_rows(tmp_path):
    """``--force --variants X`` redoes X's points; every other variant's row stays in the store."""
    both = tiny(lengths=(64,), passes=("fwd",))

    def kernel_rows():
        return {r["variant"]: r for r in report.RowStore(tmp_path / "rows.jsonl").rows()
                if r.get("kind", "cost") == "cost"}

    cost.run(both, tmp_path, progress=False)
    before = kernel_rows()
    cost.run(dataclasses.replace(both, variants=("full",)), tmp_path, force=True, progress=False)
    after = kernel_rows()
    assert set(after) == {"full", "blockwise"}
    assert after["blockwise"] == before["blockwise"]
    assert after["full"]["time_median_s"] != before["full"]["time_median_s"]  # measured again


def test_fractions_are_taken_against_the_better_of_the_two_ceilings(tmp_path, monkeypatch):
    """A ceiling measured while the CPU was busy at the start (here a scripted 1 GFLOP/s, then 1000 at
    the end) must not leave the run's rows with fractions against it: they are rebased on the end's,
    in place (one line per key), and the rows of an earlier run are left as they were."""
    cfg = tiny(variants=("full",), lengths=(64,), passes=("fwd",))
    earlier = {"variant": "earlier", "matmul_gflops": 5.0, "gflops_per_s": 2.0, "matmul_fraction": 0.4}
    report.RowStore(tmp_path / "rows.jsonl").add("cost|earlier", earlier)
    ceilings = iter([1.0, 1000.0])
    monkeypatch.setattr(measure, "matmul_rate", lambda n, **k: {"matmul_n": n, "matmul_best_gflops": next(ceilings)})
    cost.run(cfg, tmp_path, progress=False)
    store = report.RowStore(tmp_path / "rows.jsonl")
    [row] = [r for r in store.rows() if r.get("variant") == "full" and r.get("kind", "cost") == "cost"]
    assert row["matmul_gflops"] == 1000.0 and row["matmul_gflops_at_start"] == 1.0
    assert row["matmul_fraction"] == pytest.approx(row["gflops_per_s"] / 1000.0)
    assert store.get("cost|earlier") == earlier
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert len(lines) == len(store) == len({json.loads(line)["key"] for line in lines})


def test_points_over_the_memory_budget_are_skipped_with_the_reason(tmp_path):
    cfg = tiny(variants=("full",), passes=("fwd",), memory_budget_bytes=1)
    store = cost.run(cfg, tmp_path, progress=False)
    rows = {r["n"]: r for r in store.rows()}
    assert rows[64]["status"] == "skipped" and rows[64]["reason"].startswith("memory budget")
    assert rows[64]["memory_bytes"] > 1 and rows[64]["time_median_s"] is None  # compiled, never run
    assert rows[128]["status"] == "skipped" and "over budget already at N=64" in rows[128]["reason"]
    assert "skip" in (tmp_path / "table.md").read_text()


def test_points_predicted_over_the_time_budget_are_skipped(tmp_path):
    cfg = tiny(variants=("full",), passes=("fwd",), lengths=(64, 128, 256), max_call_s=1e-9)
    store = cost.run(cfg, tmp_path, progress=False)
    rows = {r["n"]: r for r in store.rows()}
    assert rows[64]["status"] == "ok"  # nothing to extrapolate from: measured
    assert rows[128]["status"] == "skipped" and rows[128]["reason"].startswith("time budget: predicted")
    assert rows[128]["compile_s"] is None  # not even compiled
    assert rows[256]["status"] == "skipped"
    # a rerun under a larger budget measures the skipped points
    store = cost.run(dataclasses.replace(cfg, max_call_s=30.0), tmp_path, progress=False)
    assert all(r["status"] == "ok" for r in store.rows())


def test_sweep_deadline_skips_the_rest_and_a_rerun_resumes(tmp_path):
    cfg = tiny(variants=("full",), passes=("fwd",), sweep_budget_s=0.0)
    store = cost.run(cfg, tmp_path, progress=False)
    assert all(r["status"] == "skipped" and r["reason"].startswith("sweep budget") for r in store.rows())
    store = cost.run(dataclasses.replace(cfg, sweep_budget_s=None), tmp_path, progress=False)
    assert [r["status"] for r in store.rows()] == ["ok", "ok"]


@dataclasses.dataclass(frozen=True)
class _BrokenConfig:
    fail_above: int = 64


@pytest.fixture
def broken_variant():
    @ea.register("broken_for_test", config=_BrokenConfig, family="test", citation="none")
    class Broken(ea.Attention):
        """Fails for long inputs, to test that the sweep records errors and goes on."""

        capabilities = ea.Capabilities(time="O(N)", memory="O(N)")

        def attend(self, q, k, v, mask):
            if q.shape[1] > self.config.fail_above:
                raise RuntimeError("too long for this test variant")
            return jnp.zeros_like(q)

    yield "broken_for_test"
    unregister("broken_for_test")


def test_a_failing_variant_is_recorded_as_an_error_the_sweep_goes_on_and_the_exit_status_is_1(
        tmp_path, monkeypatch, broken_variant, capsys):
    monkeypatch.setitem(cost.PRESETS, "quick", tiny(preset="quick", passes=("fwd",), causal_modes=(False, True)))
    code = cost.main(["--variants", f"{broken_variant},full", "--out", str(tmp_path), "--no-progress"])
    assert code == 1
    assert "cost: 1 row(s) errored" in capsys.readouterr().err
    rows = {(r["variant"], r["n"], r["causal"]): r for r in report.RowStore(tmp_path / "rows.jsonl").rows()}
    assert rows[broken_variant, 64, False]["status"] == "ok"
    err = rows[broken_variant, 128, False]
    assert err["status"] == "error" and "too long for this test variant" in err["reason"]
    assert (broken_variant, 64, True) not in rows  # not causal-capable: no causal points
    assert all(rows["full", n, c]["status"] == "ok" for n in (64, 128) for c in (False, True))
    assert "failed at N=128" in (tmp_path / "table.md").read_text()


def test_interrupt_keeps_finished_rows_and_consistent_tables(tmp_path, monkeypatch):
    real = cost_point.measure_point
    calls = []

    def interrupted(*a, **k):
        calls.append(a)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(cost_point, "measure_point", interrupted)
    cfg = tiny(passes=("fwd",))
    with pytest.raises(KeyboardInterrupt):
        cost.run(cfg, tmp_path, progress=False)
    stored = report.RowStore(tmp_path / "rows.jsonl").rows()
    assert len(stored) == 2
    assert len(_csv_rows(tmp_path / "rows.csv")) == 2
    assert len(json.loads((tmp_path / "rows.json").read_text())["rows"]) == 2
    assert (tmp_path / "table.md").exists()
    monkeypatch.setattr(cost_point, "measure_point", real)
    store = cost.run(cfg, tmp_path, progress=False)
    assert len(store) == 4 and all(r["status"] == "ok" for r in store.rows())


def _synthetic(cfg, v, n, t, m, claim):
    r = cost_point.base_row("full", "fwd", False, n, cfg)
    r.update(variant=v, time_median_s=t, memory_bytes=m, claimed_time=claim, claimed_memory=claim)
    return r


def test_analysis_slopes_ratios_and_crossover_on_synthetic_rows():
    cfg = tiny()
    ns = [256, 512, 1024, 2048]
    rows = [_synthetic(cfg, "full", n, 1e-6 * n**2, 100 * n**2, "O(N^2)") for n in ns]
    rows += [_synthetic(cfg, "blockwise", n, 2e-6 * n**2, 1000 * n, "O(N^2)") for n in ns]
    rows += [_synthetic(cfg, "lin", n, 1e-3 * n, 5000 * n, "O(N)") for n in ns]  # faster than full from 1024 on
    got = cost_report.analyse(rows)[("fwd", False)]
    assert got["full"]["time_fit"].slope == pytest.approx(2.0)
    assert got["lin"]["time_fit"].slope == pytest.approx(1.0)
    assert got["lin"]["time_claimed"] == 1.0
    assert got["lin"]["cross_time_full"].n == 1024  # 1e-3 n < 1e-6 n^2 once n > 1000
    assert got["lin"]["cross_time_blockwise"].n == 512  # 1e-3 n < 2e-6 n^2 once n > 500
    assert got["lin"]["cross_memory_full"].n == 256  # 5000 n < 100 n^2 once n > 50
    assert got["lin"]["cross_memory_blockwise"].n is None  # always 5x blockwise's memory
    md = cost_report.cost_markdown(rows, cfg, None, {"device": "cpu"})
    assert "| lin | O(N) |" in md and "none <= 2048" in md


@dataclasses.dataclass(frozen=True)
class _NoConfig:
    pass


def _register_exact(name, memory, **kw):
    @ea.register(name, config=_NoConfig, family="test", citation="none", **kw)
    class Exact(ea.Attention):
        """Softmax attention under another name, to test how baselines are found."""

        capabilities = ea.Capabilities(exact=True, time="O(N^2)", memory=memory)

        def attend(self, q, k, v, mask):
            return jnp.zeros(q.shape[:3] + v.shape[3:], q.dtype)


def test_baselines_are_the_registered_quadratic_exact_variants_and_their_fast_twins():
    # Test plugins registered by other test modules of the same worker count too (that is the
    # point: a plugin reaches every table), so only the package's own variants are pinned here.
    def packaged(names):
        return tuple(n for n in names if ea.get_spec(n).cls.__module__.startswith("efficient_attn."))

    assert cost.baselines() == cost.BASELINES == cost_report.BASELINES
    assert packaged(cost.baselines()) == ("full", "blockwise") == cost.baselines()[:2]
    assert ea.get_spec("full").fast_exact == "blockwise"  # where the twin comes from
    _register_exact("zz_quadratic_for_test", "O(N^2)")
    _register_exact("zz_linear_exact_for_test", "O(N)")  # exact but not the quadratic reference
    try:
        assert cost.baselines()[:2] == ("full", "blockwise") and "zz_quadratic_for_test" in cost.baselines()
        assert "zz_linear_exact_for_test" not in cost.baselines()
        assert cost.quadratic_reference() == "full"
        cfg = tiny()
        ns = [256, 1024]
        rows = [_synthetic(cfg, v, n, 1e-6 * n**2, 100 * n**2, "O(N^2)")
                for v in ("full", "blockwise", "zz_quadratic_for_test") for n in ns]
        rows += [_synthetic(cfg, "lin", n, 1e-3 * n, 5000 * n, "O(N)") for n in ns]
        assert "cross_time_zz_quadratic_for_test" in cost.analyse(rows)[("fwd", False)]["lin"]
        md = cost.cost_markdown(rows, cfg, None, {"device": "cpu"})
        assert "`vs full / vs blockwise / vs zz_quadratic_for_test`" in md
        assert "| time vs zz_quadratic_for_test |" in md
    finally:
        unregister("zz_quadratic_for_test")
        unregister("zz_linear_exact_for_test")


def test_points_follow_the_capabilities_maskings():
    @ea.register("causal_only_for_test", config=_NoConfig, family="test", citation="none")
    class CausalOnly(ea.Attention):
        """A recurrence: causal by construction, no bidirectional mode."""

        capabilities = ea.Capabilities(causal=True, bidirectional=False, time="O(N)", memory="O(N)")

        def attend(self, q, k, v, mask):
            return jnp.zeros_like(q)

    try:
        cfg = tiny(variants=("causal_only_for_test", "local"), causal_modes=(False, True), passes=("fwd",),
                   lengths=(64,))
        got = list(points(cfg, cfg.variants))
        assert ("causal_only_for_test", "fwd", False, 64) not in got
        assert ("causal_only_for_test", "fwd", True, 64) in got
        assert {("local", "fwd", c, 64) for c in (False, True)} <= set(got)
    finally:
        unregister("causal_only_for_test")


def test_table2_analog_measures_training_steps(tmp_path):
    pytest.importorskip("efficient_attn.nn")
    t2 = cost.Table2Config(lengths=(64,), batch=1, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=16,
                           min_repeats=1, max_repeats=2, step_budget_s=0.01)
    cfg = tiny(variants=("full",), passes=("fwd",), lengths=(64,), table2=t2)
    store = cost.run(cfg, tmp_path, progress=False)
    t2rows = {r["variant"]: r for r in store.rows() if r.get("kind") == "table2"}
    assert set(t2rows) == {"full"}
    for r in t2rows.values():
        assert r["status"] == "ok", r["reason"]
        assert r["steps_per_s"] > 0 and r["memory_bytes"] > 0
    text = (tmp_path / "table2.md").read_text()
    assert "Transformer" in text and "8.1 (1.0x)" in text  # the published row beside ours
    assert "| full | " in text and "(1.00x)" in text
    csv_rows = [r for r in _csv_rows(tmp_path / "rows.csv") if r["kind"] == "table2"]
    assert {r["variant"]: float(r["speedup_vs_full"]) for r in csv_rows}["full"] == pytest.approx(1.0)


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="lengths"):
        tiny(lengths=(0, 64))
    with pytest.raises(ValueError, match="passes"):
        tiny(passes=("sideways",))
    with pytest.raises(ValueError, match="max_repeats"):
        tiny(min_repeats=3, max_repeats=2)
    with pytest.raises(KeyError, match="unknown attention variant"):
        cost.select_variants(tiny(variants=("fulll",)))


@pytest.mark.parametrize("argv, needle", [
    (["--lengths", "0,64"], "--lengths"),
    (["--passes", "sideways"], "--passes: unknown pass 'sideways'"),
    (["--variants", "fulll"], "--variants: unknown variant 'fulll'"),
    (["--heads", "0"], "--heads"),
    (["--report-only", "--force"], "--report-only"),
])
def test_bad_flags_are_refused_in_one_line_naming_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cost.main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


PLUGIN = '''
import dataclasses
import jax
import efficient_attn as ea


@dataclasses.dataclass(frozen=True)
class MeanConfig:
    pass


@ea.register("plugin_mean_for_cost_test", config=MeanConfig, family="plugin", citation="test")
class MeanAttention(ea.Attention):
    """Every query gets the mean of the values: O(N) time and memory."""

    capabilities = ea.Capabilities(time="O(N)", memory="O(N)")

    def attend(self, q, k, v, mask):
        return jax.numpy.broadcast_to(v.mean(axis=1, keepdims=True), q.shape[:3] + v.shape[3:])
'''


def test_plugin_file_variant_is_swept(tmp_path, small_quick):
    plugin = tmp_path / "my_variant.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "out"
    try:
        code = cost.main(["--plugin", str(plugin), "--variants", "plugin_mean_for_cost_test", "--lengths", "32,64",
                          "--passes", "fwd", "--out", str(out), "--no-table2", "--no-progress",
                          "--heads", "2", "--head-dim", "8"])
        assert code == 0
        rows = _csv_rows(out / "rows.csv")
        assert [(r["variant"], r["n"], r["status"]) for r in rows] == [
            ("plugin_mean_for_cost_test", "32", "ok"), ("plugin_mean_for_cost_test", "64", "ok")]
        assert "| plugin_mean_for_cost_test | O(N) |" in (out / "table.md").read_text()
    finally:
        unregister("plugin_mean_for_cost_test")


def test_budgets_extrapolate_from_shorter_lengths_and_skip_only_longer_ones():
    b = Budgets(max_compile_s=10.0)
    s = ("full", "fwd", False)
    b.remember({"n": 1024, "status": "ok", "time_median_s": 0.1, "compile_s": 1.0}, s, "time_median_s")
    b.remember({"n": 4096, "status": "skipped", "reason": "time budget: predicted ..."}, s, "time_median_s")
    # visited out of order (Table 2 goes 1K, 4K, 2K, 3K): 2K is still tried, 8K is not
    assert b.skip_reason(s, 2048, 0.0, None) is None
    assert "N=4096" in b.skip_reason(s, 8192, 0.0, None)
    (pred, exponent), from_n = b.predict(s, 2048, measure.parse_big_o("O(N^2)"))
    assert from_n == 1024 and exponent == 2.0 and pred == pytest.approx(0.4)
    b.remember({"n": 2048, "status": "ok", "time_median_s": 0.2, "compile_s": 30.0}, s, "time_median_s")
    (pred, exponent), from_n = b.predict(s, 3072, None)
    assert from_n == 2048 and exponent == pytest.approx(1.0)  # the local slope of 1K -> 2K
    assert b.skip_reason(s, 3072, 0.0, None).startswith("compile budget")
    assert b.predict(s, 512, None) == (None, None)  # nothing shorter measured: no prediction


def test_stored_configs_read_back_equal_for_every_preset():
    from efficient_attn.sweeps.cost.config import config_from_dict
    for name, cfg in cost.PRESETS.items():
        assert config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg, name
    with pytest.raises(ValueError, match="does not know"):
        config_from_dict({**dataclasses.asdict(tiny()), "not_a_field": 1})


def test_report_only_rerenders_a_narrowed_run_with_its_stored_config(tmp_path, monkeypatch, small_quick):
    out = tmp_path / "out"
    assert cost.main(["--preset", "quick", "--passes", "fwd", "--out", str(out), *ARGV]) == 0
    config = json.loads((out / "rows.json").read_text())["config"]
    table = (out / "table.md").read_bytes()
    _no_measuring(monkeypatch)
    assert cost.main(["--preset", "quick", "--report-only", "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "rows.json").read_text())["config"] == config  # not the whole preset's
    assert config["variants"] == ["full", "blockwise"] and config["lengths"] == [64, 128]
    assert (out / "table.md").read_bytes() == table
