"""The approximation sweep: tiny runs that write every output, resume, re-render without
measuring, record errors, and read every variant's budget from its registration."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn import patterns, registry
from efficient_attn.ops.reference.lsh import shared_qk_attention
from efficient_attn.sweeps import approximation as ap
from efficient_attn.sweeps.approximation import compare
from efficient_attn.sweeps.approximation.inputs import shared_qk
from efficient_attn.sweeps.approximation.pictures import pattern_setting

TINY = ap.ApproxConfig(preset="test", seq_len=32, num_heads=1, head_dim=8, batch=1, q_scales=(0.5, 2.0),
                       seeds=(0, 1), variants=("full", "performer"), budget_points=2, pattern_len=16, trained=None)
OUTPUTS = ("table.md", "rows.csv", "rows.jsonl", "error_vs_budget.png", "patterns.png", "patterns.npz")


def _run(tmp_path, cfg=TINY, **kw):
    logs = []
    rows = ap.run(cfg, tmp_path, log=logs.append, **kw)
    return rows, logs


def _no_measuring(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a finished row was measured again")

    monkeypatch.setattr(compare, "measure_unit", boom)
    monkeypatch.setattr(patterns, "probe", boom)  # patterns come from their cache too


def test_tiny_sweep_writes_everything(tmp_path):
    rows, _ = _run(tmp_path)
    for name in ("table.md", "rows.csv", "rows.json", "rows.jsonl", "error_vs_budget.png", "patterns.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert all(r["status"] == "ok" for r in rows)
    full = [r for r in rows if r["variant"] == "full"]
    perf = [r for r in rows if r["variant"] == "performer"]
    assert len(full) == 2 and len(perf) == 2 * 2  # 2 q scales; performer: 2 budget values each
    for r in full:  # the reference against itself
        assert r["rel_err"] < 1e-5 and r["kl"] < 1e-6 and r["consistency"] < 1e-4
    for r in perf:  # approximate, positive features: a distribution with a nonzero KL, spread over seeds
        assert r["rel_err"] > 1e-3 and r["kl"] > 0 and r["distribution"] and r["rel_err_std"] > 0
    budget = ea.get_spec("performer").budget
    assert {r["value"] for r in perf} == {budget.values[0], budget.values[-1]}  # thinned to its two ends
    data = json.loads((tmp_path / "rows.json").read_text())
    assert data["environment"]["preset"] == "test" and len(data["rows"]) == len(rows)
    assert data["budgets"]["performer"] == [budget.knob, list(budget.values)]
    table = (tmp_path / "table.md").read_text()
    assert f"{budget.knob}={budget.values[-1]}" in table and "performer" in table


def test_rerun_and_report_only_reuse_the_stored_rows_and_rewrite_identical_outputs(tmp_path, monkeypatch):
    first, _ = _run(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in OUTPUTS}
    _no_measuring(monkeypatch)
    second, logs = _run(tmp_path)
    assert second == first
    assert f"{len(first)} already done" in logs[0]
    # every registered variant asked for, but only those with stored rows are rendered
    third, _ = _run(tmp_path, dataclasses.replace(TINY, variants=None), report_only=True)
    assert third == first
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data, name
    with pytest.raises(ValueError, match="report_only"):
        _run(tmp_path, force=True, report_only=True)


def test_force_on_a_subset_keeps_the_other_rows(tmp_path, monkeypatch):
    """``--force --variants X`` measures X's units again and keeps every other variant's rows."""
    first, _ = _run(tmp_path)
    measured = []
    real = compare.measure_unit
    monkeypatch.setattr(compare, "measure_unit", lambda cfg, u, *a: measured.append(u["variant"]) or real(cfg, u, *a))
    _run(tmp_path, dataclasses.replace(TINY, variants=("performer",)), force=True)
    assert measured and set(measured) == {"performer"}
    rows, _ = _run(tmp_path, report_only=True)
    assert {r["variant"] for r in rows} == {"full", "performer"}
    assert [r for r in rows if r["variant"] == "full"] == [r for r in first if r["variant"] == "full"]


def test_report_only_keeps_the_skip_notes_of_a_variant_with_nothing_to_measure(tmp_path, monkeypatch):
    """deltanet is causal-only: on bidirectional inputs it has only skips, which are stored as rows
    so that a report-only run over every registered variant still renders its notes."""
    cfg = dataclasses.replace(TINY, variants=("full", "deltanet"), causal=(False,))
    _run(tmp_path, cfg)
    table = (tmp_path / "table.md").read_text()
    assert table.count("- Skipped: deltanet on gauss inputs: no bidirectional mode") == 1  # not one per q scale
    stored = (tmp_path / "rows.jsonl").read_bytes()
    _no_measuring(monkeypatch)
    _run(tmp_path, cfg)
    assert (tmp_path / "rows.jsonl").read_bytes() == stored  # a rerun appends no second copy of the skips
    _run(tmp_path, dataclasses.replace(cfg, variants=None), report_only=True)
    assert (tmp_path / "table.md").read_text() == table


def test_report_only_leaves_pending_units_unmeasured(tmp_path, monkeypatch):
    _run(tmp_path, dataclasses.replace(TINY, variants=("full",)))
    _no_measuring(monkeypatch)
    rows, logs = _run(tmp_path, report_only=True)  # performer has no rows: left out, not measured
    assert {r["variant"] for r in rows} == {"full"}
    assert "2 rows, 2 already done" in logs[0]


def test_failing_variant_is_recorded_retried_and_exits_1(tmp_path, monkeypatch, capsys):
    @dataclasses.dataclass(frozen=True)
    class BrokenConfig:
        pass

    class Broken(ea.Attention):
        capabilities = ea.Capabilities(causal=True, cross=True, kv_mask=True)

        def attend(self, q, k, v, mask):
            raise RuntimeError("deliberately broken")

    ea.register("approx_test_broken", config=BrokenConfig)(Broken)
    try:
        cfg = dataclasses.replace(TINY, variants=("full", "approx_test_broken"), q_scales=(1.0,))
        rows, logs = _run(tmp_path, cfg)
        bad = [r for r in rows if r["variant"] == "approx_test_broken"]
        assert len(bad) == 1 and bad[0]["status"] == "error" and "deliberately broken" in bad[0]["error"]
        assert "deliberately broken" in (tmp_path / "table.md").read_text()
        assert (tmp_path / "patterns.png").exists()
        _, logs = _run(tmp_path, cfg)
        assert "1 already done" in logs[0]  # the full row is kept, the error is retried
        monkeypatch.setitem(ap.PRESETS, "quick", lambda: dataclasses.replace(cfg, preset="quick"))
        assert ap.main(["--out", str(tmp_path), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert "approximation: 1 row(s) errored" in err and "deliberately broken" in err
    finally:
        registry.unregister("approx_test_broken")


def test_budgets_come_from_the_registry_and_are_thinned_and_cut_at_n():
    spec = ea.get_spec("performer")
    hp, values, note = ap.budget_of("performer", 32, None)
    assert (hp, values, note) == (spec.budget.knob, list(spec.budget.values), "")  # not length-like: no cut
    assert ap.BUDGETS["performer"] == (spec.budget.knob, list(spec.budget.values))
    assert ap.budget_of("full", 32) == (None, [None], "")
    assert max(ap.budget_of("linformer", 32)[1]) <= 32  # length-like: ranks above N dropped
    assert "rank" in ap.LENGTH_LIKE
    assert ap.PATTERN_SETTINGS["local"] == ea.get_spec("local").pattern_setting
    from efficient_attn.sweeps.approximation.plan import thin

    assert thin([1, 2, 3, 4, 5, 6, 7], 3) == [1, 4, 7]


@dataclasses.dataclass(frozen=True)
class _WindowConfig:
    window: int = 8


def test_a_plugins_registration_drives_its_budget_picture_and_learned_note():
    """Nothing in the experiment names a variant: a new one's registration is all it reads."""

    @ea.register("windowed_for_approx_test", config=_WindowConfig, family="test", citation="none",
                 budget=ea.Budget("window", (2, 4, 64), length_like=True), pattern_setting={"window": 3})
    class Windowed(ea.Attention):
        """Holds a learned scale, so that the sweep calls it untrained."""

        capabilities = ea.Capabilities(causal=True, bidirectional=False, kv_mask=True, time="O(N w)", memory="O(N w)")

        def __init__(self, config, dims, *, rngs):
            super().__init__(config, dims, rngs=rngs)
            self.scale = nnx.Param(jnp.ones(()))

        def attend(self, q, k, v, mask):
            return self.scale * jnp.zeros(q.shape[:3] + v.shape[3:], q.dtype)

    name = "windowed_for_approx_test"
    try:
        assert ap.budget_of(name, 32) == ("window", [2, 4], "")  # 64 > N dropped
        assert ap.BUDGETS[name] == ("window", [2, 4, 64]) and name in ap.LEARNED
        assert pattern_setting(name) == {"window": 3}
        cfg = dataclasses.replace(TINY, variants=(name,), causal=(False, True))
        units, skipped = ap.plan_units(cfg, cfg.variants)
        assert {(u["causal"], u["value"]) for u in units} == {(True, 2), (True, 4)}  # causal only
        assert {s["reason"] for s in skipped} == {"no bidirectional mode (capabilities.bidirectional=False)"}
        row = {"input": "gauss", "variant": name, "hyperparameter": "window", "value": 2, "causal": True,
               "q_scale": 0.5, "status": "ok", "rel_err": 0.5, "rel_err_std": 0.0, "kl": 1.0, "kl_std": 0.0,
               "neg_mass": 0.0, "distribution": True, "consistency": 0.0}
        md = ap.markdown(cfg, [row], skipped, {})
        assert f"Untrained learned variants: {name}" in md and "| windowed_for_approx_test | window=2 |" in md
    finally:
        registry.unregister(name)


def test_trained_model_inputs(tmp_path):
    cfg = dataclasses.replace(TINY, variants=("full",), q_scales=(1.0,), seeds=(0,), batch=2,
                              trained=ap.TrainedInput(num_train=64, steps=2, mlp_dim=16, num_layers=1, layer=0))
    rows, logs = _run(tmp_path, cfg)
    tr = [r for r in rows if r["input"] == "trained"]
    assert len(tr) == 1 and tr[0]["status"] == "ok" and tr[0]["rel_err"] < 1e-5 and tr[0]["seq_len"] == 32
    assert (tmp_path / "trained_qkv.npz").exists()
    assert "trained full model" in (tmp_path / "table.md").read_text()


def test_main_accepts_variants_and_out_and_refuses_unknown_names_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ap.PRESETS, "quick", lambda: dataclasses.replace(TINY, preset="quick", variants=None))
    rc = ap.main(["--preset", "quick", "--variants", "full", "--out", str(tmp_path), "--no-trained", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "rows in" in printed and " rows (" not in printed  # the summary, without the running count
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"full"}
    for argv, needle in ((["--variants", "nonexistent_variant"], "--variants: unknown variant"),
                         (["--report-only", "--force"], "--report-only")):
        with pytest.raises(SystemExit) as exc:
            ap.main(["--preset", "quick", "--out", str(tmp_path)] + argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(lines) == 1 and needle in lines[0], lines


@pytest.mark.parametrize("causal", [False, True])
def test_shared_qk_reference_matches_reformer_with_one_bucket(causal):
    """The sweep's reference for a shared-QK variant is the package's dense one
    (ops/reference/lsh.shared_qk_attention); with N <= bucket_size Reformer is exactly it."""
    q = jax.random.normal(jax.random.key(0), (2, 24, 2, 8)) * 2
    v = jax.random.normal(jax.random.key(1), (2, 24, 2, 8))
    mask = ea.Mask(causal=causal, kv_mask=jnp.arange(24)[None, :] < jnp.array([[24], [9]]))
    k, full_mask = shared_qk(q, mask)
    sweep = ea.build(registry.exact_reference(), num_heads=2, head_dim=8, max_len=24)(q, k, v, mask=full_mask)
    dense = shared_qk_attention(q, v, mask)
    assert float(abs(sweep - dense).max()) < 1e-5
    if "reformer" not in ea.list_variants():
        pytest.skip("reformer is not registered")
    got = ea.build("reformer", num_heads=2, head_dim=8, max_len=24, bucket_size=32)(q, k, v, mask=mask)
    assert float(abs(got - dense).max()) < 1e-4


def test_probe_in_groups_equals_one_call():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 20, 1, 8)) for i in range(3))
    mask = ea.Mask(causal=True, kv_mask=jnp.arange(20)[None, :] < jnp.array([[20], [13]]))
    full = ea.build("full", num_heads=1, head_dim=8, max_len=20)
    a1, o1 = patterns.probe(full, q, k, v, mask)
    a3, o3 = patterns.probe(full, q, k, v, mask, max_entries=3 * 20 * 20)  # 3 sequences per call: 8 -> 3 groups
    assert abs(a1 - a3).max() < 1e-6 and abs(o1 - o3).max() < 1e-6
    assert abs(o1 - jnp.asarray(full(q, k, v, mask=mask))).max() < 1e-5  # the extra block is the real output
