"""The approximation sweep: tiny runs that write every output, resume, and record errors."""

import dataclasses
import json

import jax.numpy as jnp
import pytest

import efficient_attn as ea
from efficient_attn import registry
from efficient_attn.sweeps import approximation as ap

TINY = ap.ApproxConfig(preset="test", seq_len=32, num_heads=1, head_dim=8, batch=1, q_scales=(0.5, 2.0),
                       seeds=(0, 1), variants=("full", "performer"), budget_points=2, pattern_len=16, trained=None)


def _run(tmp_path, cfg=TINY, **kw):
    logs = []
    rows = ap.run(cfg, tmp_path, log=logs.append, **kw)
    return rows, logs


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
    assert {r["value"] for r in perf} == {8, 512}
    data = json.loads((tmp_path / "rows.json").read_text())
    assert data["environment"]["preset"] == "test" and len(data["rows"]) == len(rows)
    table = (tmp_path / "table.md").read_text()
    assert "num_features=512" in table and "performer" in table


def test_rerun_skips_finished_rows(tmp_path, monkeypatch):
    first, _ = _run(tmp_path)

    def boom(*a, **k):
        raise AssertionError("a finished row was measured again")

    monkeypatch.setattr(ap, "_measure_unit", boom)
    monkeypatch.setattr(ap, "_probe", boom)  # patterns come from their cache too
    second, logs = _run(tmp_path)
    assert second == first
    assert f"{len(first)} already done" in logs[0]


def test_failing_variant_is_recorded_and_retried(tmp_path):
    from efficient_attn.variants.full import FullAttention

    @dataclasses.dataclass(frozen=True)
    class BrokenConfig:
        pass

    class Broken(FullAttention):
        def __call__(self, q, k, v, *, mask=None):
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
    finally:
        registry.unregister("approx_test_broken")


def test_budget_table_and_fallbacks():
    hp, values, note = ap.budget_of("performer", 32, None)
    assert hp == "num_features" and values == ap.BUDGETS["performer"][1] and not note  # not length-like
    assert ap.budget_of("full", 32) == (None, [None], "")
    if "linformer" in ea.list_variants():
        assert max(ap.budget_of("linformer", 32)[1]) <= 32  # ranks above N dropped
    assert ap._thin([1, 2, 3, 4, 5, 6, 7], 3) == [1, 4, 7]


def test_trained_model_inputs(tmp_path):
    cfg = dataclasses.replace(TINY, variants=("full",), q_scales=(1.0,), seeds=(0,), batch=2,
                              trained=ap.TrainedInput(num_train=64, steps=2, mlp_dim=16, num_layers=1, layer=0))
    rows, logs = _run(tmp_path, cfg)
    tr = [r for r in rows if r["input"] == "trained"]
    assert len(tr) == 1 and tr[0]["status"] == "ok" and tr[0]["rel_err"] < 1e-5 and tr[0]["seq_len"] == 32
    assert (tmp_path / "trained_qkv.npz").exists()
    assert "trained full model" in (tmp_path / "table.md").read_text()


def test_main_accepts_variants_and_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ap.PRESETS, "quick", lambda: dataclasses.replace(TINY, preset="quick", variants=None))
    rc = ap.main(["--preset", "quick", "--variants", "full", "--out", str(tmp_path), "--no-trained", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "rows in" in printed and " rows (" not in printed  # the summary, without the running count
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"full"}
    with pytest.raises(KeyError, match="unknown attention variant"):
        ap.main(["--preset", "quick", "--variants", "nonexistent_variant", "--out", str(tmp_path)])


@pytest.mark.parametrize("causal", [False, True])
def test_shared_qk_reference_matches_reformer_with_one_bucket(causal):
    """With N <= bucket_size Reformer is exact shared-QK attention: the sweep's reference for it."""
    if "reformer" not in ea.list_variants():
        pytest.skip("reformer is not registered")
    import jax

    q = jax.random.normal(jax.random.key(0), (1, 24, 2, 8)) * 2
    v = jax.random.normal(jax.random.key(1), (1, 24, 2, 8))
    mask = ea.Mask(causal=causal)
    k, full_mask = ap._shared_qk(q, mask)
    want = ea.build("full", num_heads=2, head_dim=8, max_len=24)(q, k, v, mask=full_mask)
    got = ea.build("reformer", num_heads=2, head_dim=8, max_len=24, bucket_size=32)(q, k, v, mask=mask)
    assert float(abs(got - want).max()) < 1e-4


def test_probe_in_groups_equals_one_call(monkeypatch):
    import jax

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 20, 1, 8)) for i in range(3))
    mask = ea.Mask(causal=True, kv_mask=jnp.arange(20)[None, :] < jnp.array([[20], [13]]))
    full = ea.build("full", num_heads=1, head_dim=8, max_len=20)
    a1, o1 = ap._probe(full, q, k, v, mask)
    monkeypatch.setattr(ap, "PROBE_SCORES", 3 * 20 * 20)  # 3 sequences per call: 8 -> 3 groups, last padded
    a3, o3 = ap._probe(full, q, k, v, mask)
    assert abs(a1 - a3).max() < 1e-6 and abs(o1 - o3).max() < 1e-6
