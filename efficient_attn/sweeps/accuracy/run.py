"""Running the accuracy sweep into its RowStore: plan, train, store one row per (variant, task, seed).

A variant that cannot serve a task is skipped up front with the reason (``plan``, from its
capabilities and the task's declarations), never run wrongly: a bidirectional-only variant on
a causal task runs only where the task declares its layout leak-free (``tasks.bidirectional_safe``)
and the LM can run without the causal mask; a causal-only variant (``bidirectional=False``)
never runs in the bidirectional encoder, whose CLS token at position 0 a causal core would
leave blind to the sequence; on a training mesh with a "seq" axis of more than one device
(``TrainConfig.mesh``, ``--mesh``), a variant without a sequence-parallel form
(``parallel.models.has_sequence_parallel_form``) is n/a. For a task that declares groups of
rows (``tasks.eval_groups``, MQAR's pair counts) the row also holds the test accuracy per
group (``groups.py``). A run on a mesh is a row of its own: its key and fingerprint carry the
mesh (only when there is one, so that the rows stored before keep theirs) and so does the row.

A run that raises is stored as an error row with its message and retried on the next
invocation; neither stops the sweep. A finished row whose
fingerprint matches the config is never trained again (``--force`` retrains the selected
variants, tasks and seeds and keeps every other row). An
interrupted run resumes from its last orbax checkpoint under the cache directory
(``$EA_CACHE_DIR/runs/accuracy/<preset>/``), never in results/. Whatever happens, the
outputs are rebuilt from the store before ``run`` returns (``report.write_outputs``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from efficient_attn import report as ea_report
from efficient_attn import tasks as ea_tasks
from efficient_attn.registry import get_spec
from efficient_attn.sweeps.accuracy.config import (AccuracyConfig, TaskSetting, current_rows, data_fingerprint,
                                                   stored_scope, widen_scope)
from efficient_attn.sweeps.accuracy.groups import grouped_accuracy
from efficient_attn.sweeps.accuracy.report import write_outputs
from efficient_attn.sweeps.claims import Claims
from efficient_attn.train import needs_kv_mask

__all__ = ["plan", "run", "rows_of"]


def plan(variant: str, data_causal: bool, data_needs_mask: bool, *, bidirectional_safe: bool = False
         ) -> tuple[bool, str]:
    """Whether ``variant`` can serve a task, from its capabilities and the task's declarations
    (``bidirectional_safe``: no answer is readable from the input by looking ahead); ``(False,
    reason)`` if not."""
    caps = get_spec(variant).capabilities
    if data_causal and not caps.causal:
        if not bidirectional_safe:
            return False, ("non-causal variant on a causal (next-token) task: the input holds the answers "
                           "(the next tokens), which a bidirectional core would read")
        # else: the LM runs it without the causal mask (nn.LMConfig(causal=False), _build_model)
    if not data_causal and not caps.bidirectional:
        return False, ("causal-only variant (capabilities.bidirectional=False) on a bidirectional encoder task: the "
                       "classifier reads the CLS token at position 0, which a causal core would leave blind to the "
                       "sequence")
    if data_needs_mask and not caps.kv_mask:
        return False, "task has padding a query could attend to, and the variant cannot mask keys (no kv_mask)"
    return True, ""


def rows_of(cfg: AccuracyConfig, rows: list[dict]) -> list[dict]:
    """The stored rows this config asks for (its variants, tasks and seeds, at its fingerprints)."""
    wanted = set(cfg.variant_names())
    return [r for (v, _), rs in current_rows(rows, cfg).items() if v in wanted for r in rs]


def _cache_root() -> Path:
    """The project's cache (``$EA_CACHE_DIR``, else ``~/.cache/efficient_attn``), shared with tasks/."""
    from efficient_attn.tasks.cache import default_dir

    return default_dir()


def _baseline(data) -> dict[str, float]:
    """What a model that ignores the input gets on the test split."""
    t = np.asarray(data.test.targets)
    if data.kind == "token":
        t = t[t >= 0]
    counts = np.bincount(t.ravel(), minlength=data.num_classes).astype(float)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    return {"majority": float(p.max()), "unigram_bits": float(-(nz * np.log2(nz)).sum()),
            "uniform_bits": float(math.log2(data.num_classes))}


def _build_model(variant: str, kwargs: tuple, setting: TaskSetting, data, seed: int):
    from flax import nnx

    from efficient_attn.nn import CausalLM, Classifier, EncoderConfig, LMConfig

    m = setting.model
    rngs = nnx.Rngs(seed)
    common = dict(vocab_size=data.vocab_size, max_len=data.seq_len, num_classes=data.num_classes,
                  num_layers=m.num_layers, emb_dim=m.emb_dim, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
                  attention=variant, attention_kwargs=tuple(kwargs), dropout=m.dropout, position=m.position)
    if m.short_conv:  # passed only when on, so that models without the option still build
        common["short_conv"] = m.short_conv
    if data.kind == "classify":
        return Classifier(EncoderConfig(pool=m.pool, **common), rngs=rngs)
    if not data.causal:
        raise ValueError(f"task {data.name!r}: a token task must be causal for CausalLM")
    if not get_spec(variant).capabilities.causal:  # planned only where the layout is leak-free
        common["causal"] = False
    return CausalLM(LMConfig(**common), rngs=rngs)


def _load_task(setting: TaskSetting, data_seed: int):
    from efficient_attn import tasks

    return tasks.load(setting.task, seq_len=setting.seq_len, num_train=setting.num_train,
                      num_val=setting.num_val, num_test=setting.num_test, seed=data_seed,
                      **dict(setting.params))


def _key(variant: str, task: str, seed: int, mesh: str | None = None) -> str:
    # a run on a mesh is a row of its own; without one the key is what it always was
    parts = (variant, task, seed) + ((f"mesh={mesh}",) if mesh is not None else ())
    return ea_report.RowStore.make_key(*parts)


def mesh_plan(variant: str, setting: TaskSetting) -> tuple[bool, str]:
    """Whether ``variant`` can train on ``setting``'s mesh: with a "seq" axis of more than one
    device its cores must have a sequence-parallel form."""
    sizes = setting.train.mesh_sizes()
    if not sizes or sizes.get("seq", 1) == 1:
        return True, ""
    from efficient_attn.parallel.models import has_sequence_parallel_form

    if has_sequence_parallel_form(get_spec(variant).cls):
        return True, ""
    return False, (f"no sequence-parallel form (mesh {setting.train.mesh}): ring attention needs an exact variant, "
                   "context-parallel linear attention one that declares its engines (efficient_attn.parallel.models)")


def _plan_unit(variant: str, info: dict, setting: TaskSetting) -> tuple[bool, str]:
    ok, reason = _plan(variant, info)
    return mesh_plan(variant, setting) if ok else (ok, reason)


def _task_info(data) -> dict:
    """What planning and the notes need from a task's data, kept so reruns need not regenerate it."""
    return {"causal": bool(data.causal), "needs_kv_mask": bool(needs_kv_mask(data)), "metric": data.metric,
            "kind": data.kind, "seq_len": int(data.seq_len), "baseline": _baseline(data),
            "bidirectional_safe": ea_tasks.bidirectional_safe(data.name)}


def _plan(variant: str, info: dict) -> tuple[bool, str]:
    return plan(variant, info["causal"], info["needs_kv_mask"], bidirectional_safe=info.get("bidirectional_safe", False))


def run(
    cfg: AccuracyConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool | None = None,
    log=print,
    report_only: bool = False,
    table: AccuracyConfig | None = None,
    worker: int | None = None,
) -> list[dict]:
    """Train every pending (variant, task, seed) of ``cfg``; write the outputs; return the stored rows.

    ``table``: the config the outputs describe (default: ``cfg`` widened by the scope of the
    table already in ``out``, ``config.widen_scope``), so that a run narrowed to some variants,
    tasks or seeds trains only those and leaves the rest of the table in place.
    ``worker``: the index of one of several processes sharing this sweep (``--workers``): it
    trains only units it can claim (``sweeps.claims``), re-reading the store under the claim,
    so the workers split the units between them; a unit a worker stored as an error in this
    sweep (rows carry the parent's ``EA_SWEEP_ID``) is not retried by the others; each worker
    rewrites the outputs after each row, from the re-read store, under the folder's lock;
    ``force`` is refused (one worker would redo another's).

    ``force``: train the units ``cfg`` selects again even when their rows are done (their
    checkpoints are discarded first); rows of other variants, tasks or seeds stay in the store,
    so one variant can be re-run after a fix without losing the rest of the table.
    ``report_only``: train nothing, only rebuild the tables and plots from the stored rows (the
    n/a cells from the stored task information; cells not run stay counted as missing)."""
    if report_only and force:
        raise ValueError("accuracy: report_only=True re-renders the stored rows; it cannot be combined with force=True")
    if worker is not None and force:
        raise ValueError("accuracy: a worker of several processes (--workers) cannot be combined with "
                         "force=True: retrain with one process")
    out = Path(out)
    store = ea_report.RowStore(out / "rows.jsonl")
    info_path = out / "task_info.json"
    infos: dict[str, dict] = {}
    if info_path.exists():  # keyed by the data's fingerprint: a stale entry is recomputed
        try:
            infos = json.loads(info_path.read_text())
        except json.JSONDecodeError:
            infos = {}
    if table is None:
        table = widen_scope(cfg, stored_scope(out), cfg.tasks)
    variants = cfg.variant_names()
    for v in variants:
        get_spec(v)  # unknown names fail before any training
    skipped: dict[tuple[str, str], str] = {}
    runs_dir = _cache_root() / "runs" / "accuracy" / cfg.preset
    claims = Claims(runs_dir / "claims") if worker is not None else None

    def write_all() -> list[dict]:
        """The outputs from the store; a worker re-reads it and writes under the folder's lock,
        so the committed table always holds every row stored (the other workers' included)."""
        if claims is None:
            return write_outputs(out, store.rows(), table, skipped)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ".outputs.lock", "w") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            store.refresh()
            return write_outputs(out, store.rows(), table, skipped)
    sweep_id = os.environ.get("EA_SWEEP_ID") if worker is not None else None  # set by --workers' parent

    def errored_in_this_sweep(row) -> bool:  # by another worker: not retried until the next invocation
        return sweep_id is not None and row.get("status") == "error" and row.get("sweep_id") == sweep_id
    # seed-major: every (task, variant) gets its first seed before any gets its second, so an
    # interrupted sweep leaves a whole table of one seed rather than some cells with three
    units = [(seed, setting, variant) for seed in cfg.seeds for setting in cfg.tasks for variant in variants]
    loaded: dict[str, object] = {}  # task -> TaskData, loaded once per invocation

    def data_for(setting: TaskSetting):
        if setting.task not in loaded:
            loaded[setting.task] = _load_with_log(setting, cfg.data_seed, log)
        return loaded[setting.task]

    def info_for(setting: TaskSetting) -> dict:
        dfp = data_fingerprint(setting, cfg.data_seed)
        info = infos.get(setting.task)
        if info is None or info.get("fingerprint") != dfp:
            infos[setting.task] = info = dict(_task_info(data_for(setting)), fingerprint=dfp)
            ea_report.write_json(info_path, infos)
        return info

    def plan_known() -> None:
        """The n/a cells of every task whose data is known (stored info or loaded now)."""
        for setting in table.tasks:
            info = infos.get(setting.task)
            if info is not None and info.get("fingerprint") == data_fingerprint(setting, table.data_seed):
                for variant in table.variant_names():
                    ok, reason = _plan_unit(variant, info, setting)
                    if not ok:
                        skipped[(variant, setting.task)] = reason

    plan_known()
    if report_only:
        return write_outputs(out, store.rows(), table, skipped)
    t_start = time.perf_counter()
    try:
        for count, (seed, setting, variant) in enumerate(units, 1):
            fp = setting.fingerprint(cfg.kwargs_for(variant), cfg.data_seed)
            key = _key(variant, setting.task, seed, setting.train.mesh)
            prev = store.get(key)  # a worker's view may be stale: it re-reads under the claim below
            if not force and prev is not None and prev.get("status") == "ok" and prev.get("fingerprint") == fp:
                continue
            if prev is not None and errored_in_this_sweep(prev):
                continue
            info = info_for(setting)
            ok, reason = _plan_unit(variant, info, setting)
            if not ok:
                skipped[(variant, setting.task)] = reason
                continue
            claim = f"{key}|{fp}"
            if claims is not None and not claims.take(claim):
                continue  # another worker is training it
            try:
                if claims is not None:  # rows the other workers stored since: nothing left to do?
                    store.refresh()
                    prev = store.get(key)
                    if prev is not None and (prev.get("status") == "ok" and prev.get("fingerprint") == fp
                                             or errored_in_this_sweep(prev)):
                        continue
                row = _run_one(cfg, setting, variant, seed, data_for(setting), info, fp, runs_dir, progress, force)
                if sweep_id is not None:
                    row["sweep_id"] = sweep_id
                store.add(key, row)
            finally:
                if claims is not None:
                    claims.release(claim)
            done = f"{row['metric']} {row['test']:.4g}" if row["status"] == "ok" else f"ERROR {row['reason']}"
            log(f"[{count}/{len(units)}] {variant} on {setting.task} seed {seed}: {done} "
                f"({row['wall_s']:.1f} s, total {time.perf_counter() - t_start:.0f} s)")
            write_all()  # the tables follow the store row by row
        plan_known()  # tasks first loaded in this call
    finally:
        rows = write_all()
    return rows


def _load_with_log(setting: TaskSetting, data_seed: int, log):
    t0 = time.perf_counter()
    data = _load_task(setting, data_seed)
    log(f"loaded {setting.task} (L={data.seq_len}, {len(data.train)}/{len(data.val)}/{len(data.test)}) "
        f"in {time.perf_counter() - t0:.1f} s")
    return data


def _run_one(cfg, setting, variant, seed, data, info, fp, runs_dir, progress, force) -> dict:
    from efficient_attn.train import train

    spec = get_spec(variant)
    tcfg = dataclasses.replace(setting.train, seed=seed)
    kwargs = cfg.kwargs_for(variant)
    workdir = runs_dir / f"{variant}__{setting.task}__s{seed}__{fp}"
    if force and workdir.exists():
        shutil.rmtree(workdir)
    row = {
        "variant": variant, "task": setting.task, "seed": seed, "status": "ok", "reason": "",
        "family": spec.family, "exact": spec.capabilities.exact, "seq_len": data.seq_len,
        "causal": data.causal, "kv_mask_used": info["needs_kv_mask"], "fingerprint": fp,
        "variant_kwargs": dict(kwargs), "model": dataclasses.asdict(setting.model), "train": tcfg.record(),
        "baseline": info["baseline"], "metric": data.metric,
    }
    if tcfg.mesh is not None:
        row["mesh"] = tcfg.mesh
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        model = _build_model(variant, kwargs, setting, data, seed)
        res = train(model, data, tcfg, workdir=workdir, metrics_path=workdir / "metrics.jsonl",
                    use_mask=info["needs_kv_mask"], progress=progress, desc=f"{variant}/{setting.task}/s{seed}",
                    checkpoint_interval_s=cfg.checkpoint_interval_s)
        found = ea_tasks.eval_groups(data, data.test)
        if found is not None:
            name, groups = found
            scores = grouped_accuracy(res.model, data, data.test, groups, batch_size=tcfg.eval_batch,
                                      use_mask=info["needs_kv_mask"])
            row["groups"] = {"name": name, "test": {str(g): a for g, a in scores.items()}}
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # recorded and retried next time; the sweep goes on
        traceback.print_exc(file=sys.stderr)
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        row.update(status="error", reason=f"{type(err).__name__}: {msg}"[:300], wall_s=time.perf_counter() - t0,
                   test=None)
        return row
    row.update(res.summary())
    row["attention_causal"] = bool(data.causal and spec.capabilities.causal)
    # CPU seconds of this process (every thread) for the whole run: unlike wall time, not
    # inflated by other processes sharing the machine (it does not count a resumed run's past)
    row["cpu_s"] = time.process_time() - c0
    row["load_1min"], row["cores"] = os.getloadavg()[0], os.cpu_count()  # was the machine shared?
    # the cores this process could run on: a --workers worker has one, and XLA sizes its thread
    # pool (and so how some reductions split, i.e. float rounding) from it
    row["cores_used"] = len(os.sched_getaffinity(0))
    row["wall_s"] = res.wall_s + res.compile_s
    row["train_wall_s"] = res.wall_s
    shutil.rmtree(workdir, ignore_errors=True)  # finished: the row is the record
    return row


# what another experiment trains with (the recall sweep): the same model, data and planning
build_model, load_task, task_info, plan_for_task, cache_root = _build_model, _load_task, _task_info, _plan, _cache_root
