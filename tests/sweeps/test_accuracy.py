"""The accuracy sweep: a tiny run writes its tables, skips what a variant cannot do, resumes."""

import argparse
import dataclasses
import hashlib
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
                               (("vocab_size", 32), ("num_pairs", 4), ("eval_num_pairs", (2, 4)))),),
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
    # the skip path: MQAR declared as a task whose input holds the answers (it is not: see
    # test_a_bidirectional_core_runs_mqar_unmasked)
    monkeypatch.setattr(run_module.ea_tasks, "bidirectional_safe", lambda name: False)
    rows = acc.run(_tiny_cfg(["full", "_acc_test_bidirectional"]), out, progress=False, log=logs.append)

    assert [(r["variant"], r["status"]) for r in rows] == [("full", "ok")]
    (row,) = rows
    assert row["task"] == "mqar" and row["metric"] == "accuracy" and 0.0 <= row["test"] <= 1.0
    assert row["steps"] == 4 and len(row["history"]) == 2 and row["tokens_per_s"] > 0
    # per pair count: 8 test rows of each count; the groups' correct answers add up to the split's
    assert row["groups"]["name"] == "pairs" and set(row["groups"]["test"]) == {"2", "4"}
    queries = {2: 8 * 2, 4: 8 * 4}
    pooled = sum(row["groups"]["test"][str(p)] * n for p, n in queries.items()) / sum(queries.values())
    assert pooled == pytest.approx(row["test"], abs=1e-6)
    for name in ("table.md", "rows.csv", "rows.json", "curves.png", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "table.md").read_text()
    assert "| full |" in table and "n/a [" in table and "MQAR pairs=4 (acc %)" in table
    assert "## MQAR: test accuracy (%) per pairs count" in table
    assert "_acc_test_bidirectional on mqar: n/a: non-causal variant on a causal (next-token) task" in table
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
    assert "n/a [" in (out / "table.md").read_text()

    # with the cost experiment's rows present, the Pareto plot uses the cost at the task's length
    cost = [{"variant": "full", "n": n, "pass": p, "causal": c, "status": "ok", "time_median_s": 1e-3 * n,
             "memory_bytes": 1000 * n} for n in (16, 64) for p in ("fwd", "fwd_bwd") for c in (False, True)]
    (tmp_path / "results" / "cost" / "tiny").mkdir(parents=True)
    (tmp_path / "results" / "cost" / "tiny" / "rows.json").write_text(json.dumps({"rows": cost}))
    acc.write_outputs(out, rows, _tiny_cfg(["full"]))
    table = (out / "table.md").read_text()
    assert "cost results missing" not in table and "mqar at N=64 fwd_bwd" in table


def _count_runs(monkeypatch) -> list:
    """The variants ``_run_one`` trains from now on, in order (the real function still runs)."""
    calls = []
    real = run_module._run_one

    def counting(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(run_module, "_run_one", counting)
    return calls


def test_changed_config_reruns_and_errors_are_recorded(isolated, monkeypatch):
    out = isolated / "out"
    cfg = _tiny_cfg(["full"])
    calls = _count_runs(monkeypatch)
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


def test_force_retrains_only_the_selected_rows(isolated, monkeypatch):
    out = isolated / "out"
    acc.run(_tiny_cfg(["full", "linear"]), out, progress=False, log=lambda *_: None)
    before = {r["variant"]: r for r in json.loads((out / "rows.json").read_text())["rows"]}
    calls = _count_runs(monkeypatch)
    rows = acc.run(_tiny_cfg(["linear"]), out, force=True, progress=False, log=lambda *_: None)
    assert calls == ["linear"]  # retrained although its row was done
    kept = {r["variant"]: r for r in rows}
    assert set(kept) == {"full", "linear"}  # full's row is still in the store and the table
    assert kept["full"] == before["full"]
    assert "| full |" in (out / "table.md").read_text()
    assert len((out / "rows.jsonl").read_text().splitlines()) == 3  # appended; the newest line wins on load
    reloaded = {r["variant"]: r for r in acc.run(_tiny_cfg(["full", "linear"]), out, report_only=True,
                                                  log=lambda *_: None)}
    assert reloaded["linear"]["wall_s"] == kept["linear"]["wall_s"]


def test_a_bidirectional_core_runs_mqar_unmasked(isolated):
    """MQAR's values never follow their query: a bidirectional-only core trains on it in the LM
    without the causal mask, and its row says so."""
    ea.registry.load_plugin(_write(isolated, "bi.py", NONCAUSAL_PLUGIN))
    (row,) = acc.run(_tiny_cfg(["_acc_test_bidirectional"]), isolated / "out", progress=False, log=lambda *_: None)
    assert row["status"] == "ok" and row["attention_causal"] is False and 0.0 <= row["test"] <= 1.0


def test_a_narrowed_rerun_keeps_the_rest_of_the_table(isolated, monkeypatch):
    """--variants/--seeds/--tasks narrow what is trained; the table keeps the folder's scope."""
    monkeypatch.setitem(acc.PRESETS, "quick", lambda: dataclasses.replace(_tiny_cfg(["full", "linear"]), seeds=(0, 1)))
    monkeypatch.setattr(run_module, "_run_one", _fake_ok_row)
    out = isolated / "out"
    assert acc.main(["--preset", "quick", "--out", str(out), "--no-progress"]) == 0
    calls = _count_runs(monkeypatch)
    assert acc.main(["--preset", "quick", "--out", str(out), "--no-progress",
                     "--variants", "linear", "--seeds", "1", "--force"]) == 0
    assert calls == ["linear"]
    stored = json.loads((out / "rows.json").read_text())["config"]
    assert stored["variants"] == ["full", "linear"] and stored["seeds"] == [0, 1]
    table = (out / "table.md").read_text()
    assert "| full |" in table and "Not finished" not in table

    two = _tiny_cfg(["full"])
    other = dataclasses.replace(two.tasks[0], task="bytes_lm")
    preset = dataclasses.replace(two, tasks=(two.tasks[0], other))
    narrowed = dataclasses.replace(preset, tasks=(other,), variants=("linear",), seeds=(2,))
    wide = acc.config.widen_scope(narrowed, {"tasks": ["mqar"], "seeds": [0], "variants": ["full"]}, preset.tasks)
    assert [t.task for t in wide.tasks] == ["mqar", "bytes_lm"] and wide.seeds == (0, 2)
    assert wide.variants == ("full", "linear")
    assert acc.config.widen_scope(narrowed, {"tasks": ["mqar"], "seeds": [0], "variants": None},
                                  preset.tasks).variants is None
    assert acc.config.widen_scope(narrowed, None, preset.tasks) == narrowed


def test_presets_and_cli_parsing():
    lra_tasks = {"listops", "pathfinder", "mqar", "bytes_lm"}
    for name, make in acc.PRESETS.items():
        cfg = make()
        want = {"mqar", "selective_copy", "bytes_lm", "listops"} if name == "cpu" else lra_tasks
        assert cfg.preset == name and {t.task for t in cfg.tasks} == want
    cpu = acc.PRESETS["cpu"]()
    assert cpu.seeds == (0, 1, 2) and all(t.model.short_conv == 3 for t in cpu.tasks)
    mqar = dict(next(t for t in cpu.tasks if t.task == "mqar").params)
    assert mqar["vocab_size"] >= 1024 and max(mqar["eval_num_pairs"]) >= 16 and len(mqar["train_num_pairs"]) > 1
    assert dict(cpu.sanity) == {"mqar": 0.95, "selective_copy": 0.95, "listops": 0.30}
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
    assert acc.PRESETS == {"quick": presets.quick, "cpu": presets.cpu, "cpu_v1": presets.cpu_v1, "lra": presets.lra}
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


CAUSAL_ONLY_PLUGIN = textwrap.dedent(
    """
    import dataclasses
    import efficient_attn as ea
    from efficient_attn.variants.full import full_attention

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        pass

    @ea.register("_acc_test_causal_only", config=Cfg)
    class CausalOnly(ea.Attention):
        '''Softmax attention refusing bidirectional calls (a recurrence's capabilities).'''
        capabilities = ea.Capabilities(causal=True, bidirectional=False, kv_mask=True)

        def attend(self, q, k, v, mask):
            return full_attention(q, k, v, mask)
    """
)


def _write(tmp, name, text):
    path = tmp / name
    path.write_text(text)
    return path


def test_plan_reads_capabilities_and_task_declarations(isolated):
    ea.registry.load_plugin(_write(isolated, "bi.py", NONCAUSAL_PLUGIN))
    ea.registry.load_plugin(_write(isolated, "co.py", CAUSAL_ONLY_PLUGIN))
    try:
        bi, co = "_acc_test_bidirectional", "_acc_test_causal_only"
        # a causal-only core is never put in the bidirectional encoder
        ok, why = acc.plan(co, False, True)
        assert not ok and "causal-only" in why and "CLS" in why
        assert acc.plan(co, True, False) == (True, "")
        # a bidirectional-only core: never where the input holds the answers
        ok, why = acc.plan(bi, True, False, bidirectional_safe=False)
        assert not ok and "would read" in why
        assert acc.plan(bi, True, False, bidirectional_safe=True) == (True, "")  # LMConfig(causal=False)
        assert acc.plan(bi, False, True) == (True, "")
    finally:
        ea.registry.unregister("_acc_test_causal_only")


def _row(cfg, variant, seed, test, groups=None, task="mqar"):
    setting = next(t for t in cfg.tasks if t.task == task)
    row = {"variant": variant, "task": task, "seed": seed, "status": "ok", "metric": "accuracy", "test": test,
           "tokens_per_s": 1.0, "wall_s": 1.0, "fingerprint": setting.fingerprint((), 0), "causal": True,
           "baseline": {"majority": 0.1}}
    if groups is not None:
        row["groups"] = {"name": "pairs", "test": {str(k): v for k, v in groups.items()}}
    return row


def test_report_headlines_the_hardest_group_counts_what_is_missing_and_states_sanity_first():
    from efficient_attn.sweeps.accuracy.report import reference_variant

    ref = reference_variant()
    cfg = dataclasses.replace(_tiny_cfg([ref, "local"]), seeds=(0, 1), sanity=(("mqar", 0.95),))
    # before any row: the table lists every variant, the sanity line is stated, all cells pending
    text = acc.markdown([], cfg, {}, {}, "none")
    assert f"| {ref} |" in text and "| local |" in text
    assert "attention solves MQAR" in text and "(threshold 95%): not run yet" in text
    assert "Not finished: 2 of 2 cells" in text and "0 of 4 runs are done" in text
    rows = [_row(cfg, ref, 0, 0.90, {2: 1.0, 4: 0.96}), _row(cfg, ref, 1, 0.92, {2: 1.0, 4: 0.98}),
            _row(cfg, "local", 0, 0.5, {2: 0.75, 4: 0.25})]
    text = acc.markdown(rows, cfg, {}, {}, "none")
    assert "MQAR pairs=4 (acc %)" in text
    line = next(x for x in text.splitlines() if x.startswith(f"| {ref} |"))
    assert "97.0 ± 1.4" in line  # the hardest count's mean ± std, not the mixture's 91%
    assert "| local | 75.0 | 25.0 | 1 |" in text  # the per-count table
    assert "on its hardest pairs count (4): 97.0% -> holds (threshold 95%)" in text
    assert "Not finished: 1 of 2 cells" in text and "3 of 4 runs are done" in text and "local/mqar (1/2)" in text
    complete = rows + [_row(cfg, "local", 1, 0.5, {2: 0.75, 4: 0.25})]
    assert "Not finished" not in acc.markdown(complete, cfg, {}, {}, "none")
    # n/a cells are neither blank nor counted as missing
    text = acc.markdown(rows[:2], cfg, {("local", "mqar"): "a reason"}, {}, "none")
    assert "n/a [1]" in text and "local on mqar: n/a: a reason" in text and "Not finished" not in text
    # a variant whose hyperparameters meet its declared exact limit at the task's length is named
    assert "meet their declared exact limit" not in text
    wide = dataclasses.replace(cfg, variant_kwargs=(("local", (("window", 32),)),))
    assert "local at N=32." in acc.markdown([], wide, {}, {}, "none")


def test_short_conv_reaches_the_model_and_keeps_old_fingerprints(isolated):
    setting = _tiny_cfg(["full"]).tasks[0]
    with_conv = dataclasses.replace(setting, model=dataclasses.replace(TINY_MODEL, short_conv=3))
    # a field at its old default stays out of the hash, so rows stored before it still match
    blob = dataclasses.asdict(setting)
    del blob["model"]["short_conv"], blob["model"]["position"]
    del blob["train"]["mesh"]  # added later still: absent from stored fingerprints while None
    old = hashlib.sha256(json.dumps([blob, (), 0], sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert setting.fingerprint((), 0) == old and with_conv.fingerprint((), 0) != old
    data = run_module._load_task(setting, 0)
    assert run_module._build_model("full", (), with_conv, data, 0).conv is not None
    assert run_module._build_model("full", (), setting, data, 0).conv is None


def test_report_only_rebuilds_the_tables_and_trains_nothing(isolated, monkeypatch, capsys):
    from conftest import forbid

    out = isolated / "results" / "accuracy" / "tiny"
    rows = acc.run(_tiny_cfg(["full"]), out, progress=False, log=lambda *a: None)
    (out / "table.md").unlink()
    forbid(monkeypatch, (run_module, "_run_one"), (run_module, "_load_task"))
    # blockwise is pending: report-only leaves it pending (counted as not run) instead of training it
    again = acc.run(_tiny_cfg(["full", "blockwise"]), out, progress=False, report_only=True)
    assert again == rows
    table = (out / "table.md").read_text()
    assert "| full |" in table and "| blockwise |" in table
    with pytest.raises(ValueError, match="cannot be combined with force"):
        acc.run(_tiny_cfg(["full"]), out, report_only=True, force=True)
    cli = importlib.import_module("efficient_attn.sweeps.accuracy.cli")
    with pytest.raises(SystemExit) as err:
        cli.main(["--preset", "quick", "--report-only", "--force", "--out", str(out)])
    assert err.value.code == 2 and "--report-only" in capsys.readouterr().err
