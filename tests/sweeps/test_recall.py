"""The recall-against-state-size sweep (sweeps/recall): its points, the state it measures, and a
tiny run that writes its table and plot from rows, skips what a variant cannot do, and resumes."""

import argparse
import dataclasses
import importlib
import json
import textwrap
from pathlib import Path

import pytest

import efficient_attn as ea
from efficient_attn.sweeps import recall
from efficient_attn.sweeps.accuracy import ModelSize, TaskSetting
from efficient_attn.sweeps.accuracy.report import reference_variant
from efficient_attn.sweeps.recall.state import DECODE, KV_BOUND
from efficient_attn.train import TrainConfig

run_module = importlib.import_module("efficient_attn.sweeps.recall.run")
cli_module = importlib.import_module("efficient_attn.sweeps.recall.cli")

TINY = TaskSetting("mqar", 32, 32, 16, 16, ModelSize(num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32, short_conv=3),
                   TrainConfig(lr=3e-3, warmup=1, steps=4, batch_size=8, eval_every=2, eval_batch_size=8),
                   (("vocab_size", 32), ("num_pairs", 4), ("eval_num_pairs", (2, 4))))

PLUGIN = textwrap.dedent(
    """
    import dataclasses
    import efficient_attn as ea
    from efficient_attn.variants.full import full_attention

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        window: int = 8

    @ea.register("_recall_test_windowed", config=Cfg, budget=ea.Budget("window", (4, 8, 64), length_like=True))
    class Windowed(ea.Attention):
        '''Softmax attention (the window is only a declared knob here), no decoding state.'''
        capabilities = ea.Capabilities(causal=True, kv_mask=True)

        def attend(self, q, k, v, mask):
            return full_attention(q, k, v, mask)

    @ea.register("_recall_test_bidirectional", config=Cfg)
    class Bidirectional(ea.Attention):
        capabilities = ea.Capabilities(causal=False, kv_mask=True)

        def attend(self, q, k, v, mask):
            return full_attention(q, k, v, mask)
    """
)


@pytest.fixture()
def plugins(tmp_path, monkeypatch):
    monkeypatch.setenv("EA_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "plugin.py"
    path.write_text(PLUGIN)
    ea.registry.load_plugin(path)
    yield tmp_path
    ea.registry.unregister("_recall_test_windowed")
    ea.registry.unregister("_recall_test_bidirectional")


def test_points_cover_widths_and_the_declared_budget(plugins):
    cfg = recall.RecallConfig(preset="tiny", task=TINY, widths=(8, 16), budget_width=16)
    pts = recall.points(cfg, "_recall_test_windowed")
    assert [(p.axis, p.value) for p in pts] == [("width", 8), ("width", 16), ("budget", 4), ("budget", 8)]  # 64 > N
    assert [p.width for p in pts] == [8, 16, 16, 16] and pts[1].setting.model.mlp_dim == 32
    assert pts[2].kwargs == (("window", 4),) and len({p.fingerprint(0) for p in pts}) == 4
    assert [p.axis for p in recall.points(cfg, reference_variant())] == ["width", "width"]  # no budget declared
    with pytest.raises(ValueError, match="multiple of the model's 2 heads"):
        recall.RecallConfig(preset="tiny", task=TINY, widths=(7,))
    with pytest.raises(ValueError, match="MQAR"):
        recall.RecallConfig(preset="tiny", task=dataclasses.replace(TINY, task="bytes_lm"))


def test_state_is_measured_from_the_decoding_state_or_bounded_by_a_kv_cache(plugins):
    N, H, d = 32, 2, 8
    assert recall.state_floats("_recall_test_windowed", (), num_heads=H, head_dim=d, max_len=N) == (2 * N * H * d,
                                                                                                   KV_BOUND)
    exact_decoders = [v for v in ea.list_variants()
                      if ea.get_spec(v).capabilities.decode and ea.get_spec(v).capabilities.exact]
    assert exact_decoders  # exact attention decodes with a KV cache: keys and values of every position
    for v in exact_decoders:
        floats, kind = recall.state_floats(v, (), num_heads=H, head_dim=d, max_len=N)
        assert kind == DECODE and floats >= 2 * N * H * d, v


def test_tiny_run_writes_table_and_plot_skips_and_resumes(plugins, monkeypatch):
    ref = reference_variant()
    cfg = recall.RecallConfig(preset="tiny", task=TINY, widths=(8, 16), budget_width=None,
                              variants=(ref, "_recall_test_bidirectional"))
    out = plugins / "results" / "recall" / "tiny"
    rows = recall.run(cfg, out, progress=False, log=lambda *_: None)
    assert sorted((r["variant"], r["value"], r["status"]) for r in rows) == [(ref, 8, "ok"), (ref, 16, "ok")]
    for r in rows:
        assert set(r["groups"]["test"]) == {"2", "4"} and r["state_floats"] > 0 and r["cpu_s"] > 0
        pooled = (r["groups"]["test"]["2"] * 16 + r["groups"]["test"]["4"] * 32) / 48  # 8 rows of each count
        assert pooled == pytest.approx(r["test"], abs=1e-6)
    assert rows[0]["state_floats"] < rows[1]["state_floats"]  # a wider head keeps more
    table = (out / "table.md").read_text()
    assert "pairs=2 | pairs=4" in table and f"| {ref} |" in table and "width 16" in table
    assert "_recall_test_bidirectional: n/a: non-causal variant" in table
    assert (out / "recall.png").stat().st_size > 0
    saved = json.loads((out / "rows.json").read_text())
    assert saved["config"]["preset"] == "tiny" and len(saved["rows"]) == 2

    def boom(*a, **k):
        raise AssertionError("a finished point was retrained")

    monkeypatch.setattr(run_module, "_run_point", boom)
    again = recall.run(cfg, out, progress=False, log=lambda *_: None)
    assert again == rows and (out / "table.md").read_text().split("Environment")[0] == table.split("Environment")[0]
    # a third width is pending and said so, never silently missing
    wider = dataclasses.replace(cfg, widths=(8, 16, 32))
    text = recall.markdown(rows, wider, {"_recall_test_bidirectional": "non-causal"}, {})
    assert "Not finished: 1 points" in text and f"{ref} width=32 (0/1)" in text


def test_a_point_trained_by_the_accuracy_experiment_is_not_trained_again(plugins, monkeypatch):
    from efficient_attn.sweeps import accuracy

    ref = reference_variant()
    acc_cfg = accuracy.AccuracyConfig(preset="tiny", tasks=(TINY,), variants=(ref,))
    acc_rows = accuracy.run(acc_cfg, plugins / "results" / "accuracy" / "tiny", progress=False, log=lambda *_: None)
    trained = []
    real = run_module._run_point
    monkeypatch.setattr(run_module, "_run_point", lambda cfg, point, *a, **k: trained.append(point.value)
                        or real(cfg, point, *a, **k))
    cfg = recall.RecallConfig(preset="tiny", task=TINY, widths=(8, 16), budget_width=None, variants=(ref,))
    out = plugins / "results" / "recall" / "tiny"
    rows = {r["value"]: r for r in recall.run(cfg, out, progress=False, log=lambda *_: None)}
    assert trained == [8]  # width 16 is TINY's own model: the accuracy run trained exactly it
    (acc_row,) = acc_rows
    assert rows[16]["groups"] == acc_row["groups"] and rows[16]["test"] == acc_row["test"]
    assert rows[16]["reused_from"].endswith("accuracy/tiny/rows.jsonl") and "reused_from" not in rows[8]
    assert rows[16]["state_floats"] > rows[8]["state_floats"]
    assert "1 points were not trained again" in (out / "table.md").read_text()
    trained.clear()
    forced = recall.run(cfg, plugins / "results" / "recall" / "tiny_alone", progress=False, log=lambda *_: None,
                        reuse=None)
    assert sorted(trained) == [8, 16] and not any(r.get("reused_from") for r in forced)


def test_a_run_of_some_variants_keeps_the_others_in_the_table(plugins, monkeypatch):
    ref = reference_variant()
    fake = lambda cfg, point, seed, *a, **k: {  # noqa: E731  (a finished row, without training)
        "variant": point.variant, "family": "x", "axis": point.axis, "value": point.value, "width": point.width,
        "variant_kwargs": dict(point.kwargs), "seed": seed, "status": "ok", "reason": "",
        "fingerprint": point.fingerprint(cfg.data_seed), "state_floats": 1, "state_kind": "measured",
        "test": 0.5, "groups": {"name": "pairs", "test": {"2": 0.5, "4": 0.5}}, "wall_s": 0.0}
    monkeypatch.setattr(run_module, "_run_point", fake)
    out = plugins / "results" / "recall" / "tiny"
    both = recall.RecallConfig(preset="tiny", task=TINY, widths=(8,), budget_width=None,
                               variants=(ref, "_recall_test_windowed"))
    recall.run(both, out, progress=False, log=lambda *_: None)
    recall.run(dataclasses.replace(both, variants=("_recall_test_windowed",)), out, progress=False,
               log=lambda *_: None)
    assert json.loads((out / "rows.json").read_text())["config"]["variants"] == [ref, "_recall_test_windowed"]
    assert f"| {ref} |" in (out / "table.md").read_text()
    # a forced run of one variant retrains its points only; the other's rows stay in the store
    trained = []
    monkeypatch.setattr(run_module, "_run_point", lambda cfg, point, *a, **k: trained.append(point.variant)
                        or dict(fake(cfg, point, *a, **k), test=0.75))
    recall.run(dataclasses.replace(both, variants=(ref,)), out, force=True, progress=False, log=lambda *_: None)
    assert trained == [ref]
    rows = {r["variant"]: r for r in json.loads((out / "rows.json").read_text())["rows"]}
    assert rows[ref]["test"] == 0.75 and rows["_recall_test_windowed"]["test"] == 0.5


def test_presets_and_cli():
    for name, make in recall.PRESETS.items():
        cfg = make()
        assert cfg.preset == name and cfg.task.task == "mqar" and cfg.task.model.short_conv == 3
    cpu = recall.PRESETS["cpu"]()
    assert cpu.widths == (32, 64, 128) and cpu.budget_width == 64


@pytest.mark.parametrize("argv, flag, says", [
    (["--preset", "nope"], "--preset", "invalid choice: 'nope'"),
    (["--variants", ","], "--variants", "expected at least one comma-separated name"),
    (["--variants", "full,nosuch"], "--variants", "unknown variant 'nosuch'"),
    (["--variants", "ful"], "--variants", "did you mean full?"),
    (["--seeds", "x"], "--seeds", "non-negative integers, got 'x'"),
    (["--seeds", "0,-1"], "--seeds", "non-negative integers, got '0,-1'"),
    (["--steps", "0"], "--steps", "positive integer, got '0'"),
    (["--steps", "-1"], "--steps", "positive integer, got '-1'"),
    (["--steps", "1.5"], "--steps", "positive integer, got '1.5'"),
    (["--plugin", "{tmp}"], "--plugin", "is a directory, expected a .py file"),
    (["--plugin", "{tmp}/missing.py"], "--plugin", "does not exist, expected a .py file"),
    (["--mesh", "data=2,tensor=2"], "--mesh", "axis 'tensor'"),
    (["--mesh", "data=2,seq=4"], "--mesh data=2,seq=4", "needs 8 devices, this process has 1"),
    (["--mesh", "data=7"], "--mesh data=7", "needs 7 devices, this process has 1"),
])
def test_bad_flags_exit_2_with_one_line_naming_the_flag(argv, flag, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_module, "run", lambda *a, **k: pytest.fail("a bad flag reached the sweep"))
    with pytest.raises(SystemExit) as exit_:
        recall.main([a.format(tmp=tmp_path) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert err.startswith(f"experiments/recall.py: error: {flag}: ") and says in err, err


def test_flags_override_the_preset():
    config_from_args, parse_args = cli_module.config_from_args, cli_module.parse_args
    cfg = config_from_args(parse_args(["--variants", "full,local", "--seeds", "3,4", "--steps", "1"]))
    assert cfg.variants == ("full", "local") and cfg.seeds == (3, 4)
    tr = cfg.task.train  # one step: evaluated at it, no warm-up longer than the run
    assert (tr.steps, tr.eval_every, tr.warmup) == (1, 1, 0)
    assert config_from_args(parse_args([])) == recall.PRESETS["quick"]()


def test_mesh_runs_are_rows_of_their_own_in_a_folder_of_their_own():
    """``--mesh``: the task trains on that mesh (TrainConfig.mesh), the rows' keys and
    fingerprints carry it (the plain ones are unchanged), the default folder names it; on a
    seq axis of more than one device a variant with no sequence-parallel form is planned out."""
    from efficient_attn.sweeps.recall.config import points

    config_from_args, parse_args = cli_module.config_from_args, cli_module.parse_args
    plain = config_from_args(parse_args(["--variants", "full"]))
    meshed = config_from_args(parse_args(["--variants", "full", "--mesh", "data=1"]))
    assert plain.task.train.mesh is None and meshed.task.train.mesh == "data=1"
    assert cli_module.default_out(plain) == Path("results/recall/quick")
    assert cli_module.default_out(meshed) == Path("results/recall/quick_mesh_data1")
    p0, m0 = points(plain, "full")[0], points(meshed, "full")[0]
    assert run_module.key_of(p0, 0) == "full|width|32|0"
    assert run_module.key_of(m0, 0) == "full|width|32|0|mesh=data=1"
    assert p0.fingerprint(0) != m0.fingerprint(0)
    by_hand = argparse.Namespace(preset="quick", variants=None, seeds=None, steps=None, mesh="data=7")
    with pytest.raises(ValueError, match=r"--mesh data=7: TrainConfig: .*must be divisible .*'data'"):
        config_from_args(by_hand)  # the batch check (parse, which main runs first, counts devices)
    seq = dataclasses.replace(plain, task=dataclasses.replace(
        plain.task, train=dataclasses.replace(plain.task.train, mesh="seq=2")))
    info = {"causal": True, "needs_kv_mask": False, "kind": "lm", "seq_len": plain.task.seq_len,
            "bidirectional_safe": False}
    assert run_module._plan("full", info, seq) == (True, "")
    ok, reason = run_module._plan("linear", info, seq)
    assert not ok and "no sequence-parallel form (mesh seq=2)" in reason
