"""The accuracy sweep: a tiny run writes its tables, skips what a variant cannot do, resumes."""

import argparse
import importlib
import json
import textwrap

import pytest

import efficient_attn as ea
from efficient_attn.sweeps import accuracy as acc
from efficient_attn.train import TrainConfig

# the package's ``run`` attribute is the function; the module of that name holds the helpers
run_module = importlib.import_module("efficient_attn.sweeps.accuracy.run")

TINY_TRAIN = TrainConfig(lr=3e-3, warmup=1, steps=4, batch_size=8, eval_every=2, eval_batch_size=8)
TINY_MODEL = acc.ModelSize(num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32)


def _tiny_cfg(variants):
    return acc.AccuracyConfig(
        preset="tiny",
        tasks=(acc.TaskSetting("mqar", 32, 32, 16, 16, TINY_MODEL, TINY_TRAIN,
                               (("vocab_size", 32), ("num_pairs", 4))),),
        variants=tuple(variants),
    )


NONCAUSAL_PLUGIN = textwrap.dedent(
    """
    import dataclasses
    import efficient_attn as ea
    from efficient_attn.variants.full import full_attention

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        pass

    @ea.register("_acc_test_bidirectional", config=Cfg)
    class Bidirectional(ea.Attention):
        '''Softmax attention that cannot do causal masking (for the skip test).'''
        capabilities = ea.Capabilities(causal=False, kv_mask=True)

        def attend(self, q, k, v, mask):
            return full_attention(q, k, v, mask)
    """
)


@pytest.fixture()
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("EA_CACHE_DIR", str(tmp_path / "cache"))
    yield tmp_path
    ea.registry.unregister("_acc_test_bidirectional")


def test_tiny_sweep_writes_tables_skips_and_resumes(isolated, monkeypatch):
    tmp_path = isolated
    plugin = tmp_path / "plugin.py"
    plugin.write_text(NONCAUSAL_PLUGIN)
    ea.registry.load_plugin(plugin)
    out = tmp_path / "results" / "accuracy" / "tiny"
    logs = []
    rows = acc.run(_tiny_cfg(["full", "_acc_test_bidirectional"]), out, progress=False, log=logs.append)

    assert [(r["variant"], r["status"]) for r in rows] == [("full", "ok")]
    (row,) = rows
    assert row["task"] == "mqar" and row["metric"] == "accuracy" and 0.0 <= row["test"] <= 1.0
    assert row["steps"] == 4 and len(row["history"]) == 2 and row["tokens_per_s"] > 0
    for name in ("table.md", "rows.csv", "rows.json", "curves.png", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "table.md").read_text()
    assert "| full |" in table and "skip [" in table
    assert "_acc_test_bidirectional on mqar: skipped: non-causal variant on a causal" in table
    assert "cost results missing: run cost_scaling first" in table
    saved = json.loads((out / "rows.json").read_text())
    assert saved["environment"]["preset"] == "tiny" and saved["config"]["preset"] == "tiny"
    assert saved["skipped"][0]["variant"] == "_acc_test_bidirectional"
    csv_lines = (out / "rows.csv").read_text().splitlines()
    assert csv_lines[0].startswith("variant,task,seed,status") and len(csv_lines) == 3
    # the finished run's checkpoints are gone from the cache; results/ never held them
    assert not list((tmp_path / "cache" / "runs").rglob("*__s0__*"))

    # a rerun trains nothing and keeps the row, skip note included
    def boom(*a, **k):
        raise AssertionError("a finished row was recomputed")

    monkeypatch.setattr(run_module, "_run_one", boom)
    again = acc.run(_tiny_cfg(["full", "_acc_test_bidirectional"]), out, progress=False, log=logs.append)
    assert again == rows
    assert "skip [" in (out / "table.md").read_text()

    # with the cost experiment's rows present, the Pareto plot uses the cost at the task's length
    cost = [{"variant": "full", "n": n, "pass": p, "causal": c, "status": "ok", "time_median_s": 1e-3 * n,
             "memory_bytes": 1000 * n} for n in (16, 64) for p in ("fwd", "fwd_bwd") for c in (False, True)]
    (tmp_path / "results" / "cost" / "tiny").mkdir(parents=True)
    (tmp_path / "results" / "cost" / "tiny" / "rows.json").write_text(json.dumps({"rows": cost}))
    acc.write_outputs(out, rows, _tiny_cfg(["full"]))
    table = (out / "table.md").read_text()
    assert "cost results missing" not in table and "mqar at N=64 fwd_bwd" in table


def test_changed_config_reruns_and_errors_are_recorded(isolated, monkeypatch):
    out = isolated / "out"
    cfg = _tiny_cfg(["full"])
    calls = []
    real = run_module._run_one

    def counting(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(run_module, "_run_one", counting)
    acc.run(cfg, out, progress=False, log=lambda *_: None)
    longer = acc.AccuracyConfig(preset="tiny", variants=("full",), tasks=(
        acc.TaskSetting("mqar", 32, 32, 16, 16, TINY_MODEL, TrainConfig(lr=3e-3, warmup=1, steps=6, batch_size=8,
                                                                        eval_every=2, eval_batch_size=8),
                        (("vocab_size", 32), ("num_pairs", 4))),))
    rows = acc.run(longer, out, progress=False, log=lambda *_: None)
    assert calls == ["full", "full"] and rows[0]["steps"] == 6  # a changed config is not "finished"

    monkeypatch.setattr(run_module, "_build_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("kaput")))
    rows = acc.run(cfg, isolated / "out2", progress=False, log=lambda *_: None)
    assert rows[0]["status"] == "error" and "kaput" in rows[0]["reason"]
    assert "error [" in (isolated / "out2" / "table.md").read_text()


def test_presets_and_cli_parsing():
    for name, make in acc.PRESETS.items():
        cfg = make()
        assert cfg.preset == name and {t.task for t in cfg.tasks} == {"listops", "pathfinder", "mqar", "bytes_lm"}
    assert len(acc.PRESETS["cpu"]().seeds) == 3
    lra = {t.task: t for t in acc.PRESETS["lra"]().tasks}
    assert lra["listops"].seq_len == 2000 and lra["listops"].model.emb_dim == 512
    assert lra["listops"].train.schedule == "rsqrt" and lra["pathfinder"].model.pool == "mean"
    quick = acc.PRESETS["quick"]()
    assert all(128 <= t.seq_len <= 256 for t in quick.tasks) and quick.seeds == (0,)
    p = argparse.Namespace(preset="quick", tasks="mqar,listops", variants="full", seeds="0,1", steps=3)
    cfg = acc.config_from_args(p)
    assert [t.task for t in cfg.tasks] == ["listops", "mqar"] and cfg.variants == ("full",) and cfg.seeds == (0, 1)
    assert all(t.train.steps == 3 and t.train.eval_every <= 3 for t in cfg.tasks)
    with pytest.raises(SystemExit):
        acc.config_from_args(p.__class__(preset="quick", tasks="imagenet", variants=None, seeds=None, steps=None))
    with pytest.raises(SystemExit, match="--steps"):  # 0 is refused, not read as "no override"
        acc.config_from_args(argparse.Namespace(preset="quick", tasks=None, variants=None, seeds=None, steps=0))
    with pytest.raises(SystemExit, match="--seeds"):
        acc.config_from_args(argparse.Namespace(preset="quick", tasks=None, variants=None, seeds="x", steps=None))


def test_the_package_keeps_the_module_names():
    from efficient_attn.sweeps.accuracy import presets

    for name in ("ModelSize", "TaskSetting", "AccuracyConfig", "PRESETS", "PUBLISHED_TABLE1", "PUBLISHED_TASKS",
                 "TASK_TITLES", "CSV_COLUMNS", "plan", "run", "markdown", "plot_pareto", "plot_curves",
                 "write_outputs", "config_from_args", "main"):
        assert hasattr(acc, name), name
    assert acc.PRESETS == {"quick": presets.quick, "cpu": presets.cpu, "lra": presets.lra}
    assert acc.PRESETS["quick"]() == presets.quick()  # a factory: a fresh, equal config per call
    assert acc.run is run_module.run and acc.plan("full", True, True) == (True, "")


def test_sanity_expectations_read_the_registry_reference():
    from efficient_attn.sweeps.accuracy.report import reference_variant

    ref = reference_variant()
    spec = ea.get_spec(ref)
    assert spec.capabilities.exact and spec.fast_exact  # full -> blockwise today
    cfg = _tiny_cfg([ref])
    row = {"variant": ref, "task": "mqar", "seed": 0, "status": "ok", "metric": "accuracy", "test": 0.995,
           "tokens_per_s": 1.0, "wall_s": 1.0, "fingerprint": cfg.tasks[0].fingerprint((), 0)}
    text = acc.markdown([row], cfg, {}, {}, "none")
    assert f"- {ref} attention solves MQAR" in text and "99.5% -> holds" in text
    assert f"`{ref}` trains on the {spec.fast_exact} kernel" in text
    text = acc.markdown([dict(row, test=0.5)], cfg, {}, {}, "none")
    assert "50.0% -> does NOT hold" in text


def _fake_ok_row(cfg, setting, variant, seed, data, info, fp, *rest):
    """What _run_one stores, without training (the exit status depends on rows only)."""
    return {"variant": variant, "task": setting.task, "seed": seed, "status": "ok", "reason": "",
            "metric": data.metric, "test": 0.5, "wall_s": 0.0, "tokens_per_s": 1.0, "history": [],
            "causal": data.causal, "fingerprint": fp, "baseline": info["baseline"]}


def test_main_exits_1_when_a_row_of_its_run_errored(isolated, monkeypatch, capsys):
    monkeypatch.setitem(acc.PRESETS, "quick", lambda: _tiny_cfg(["full"]))
    out = str(isolated / "out")
    argv = ["--preset", "quick", "--out", out, "--no-progress"]

    monkeypatch.setattr(run_module, "_build_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("kaput")))
    assert acc.main(argv) == 1
    err = capsys.readouterr().err
    assert "accuracy: 1 row(s) errored" in err and "variant=full task=mqar seed=0: RuntimeError: kaput" in err

    # another variant's run is not failed by full's stored error row
    monkeypatch.setattr(run_module, "_run_one", _fake_ok_row)
    assert acc.main(argv + ["--variants", "local"]) == 0
    # a rerun retries the errored row; once it is ok, the exit status is 0
    assert acc.main(argv) == 0
    rows = [json.loads(line)["row"] for line in (isolated / "out" / "rows.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["status"]) for r in rows] == [("full", "error"), ("local", "ok"), ("full", "ok")]
