"""Running the recall sweep into its RowStore: one row per (variant, axis, value, seed).

Each point trains the accuracy experiment's model (``accuracy.run.build_model``: the same LM,
short convolution included) on the sweep's MQAR setting with ``train.train``, then scores
the best-validation model per pair count (``accuracy.groups``) and records the state the
variant keeps per layer (``state.py``). Variants that cannot serve the task are skipped with
the reason (``accuracy.run.plan_for_task``); a failing point is an error row, retried next
time; finished points are never retrained; the outputs are rebuilt from the store at the end.

A point whose training is the accuracy experiment's (the same variant, seed and fingerprint:
the width of the accuracy preset's MQAR model at the registered defaults) is not trained
again: its row is built from the accuracy row in ``results/accuracy/<preset>/rows.jsonl``
(test accuracy per pair count, history, times), with ``reused_from`` naming that file.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from efficient_attn import report as ea_report
from efficient_attn import tasks as ea_tasks
from efficient_attn.registry import get_spec
from efficient_attn.sweeps.accuracy.config import data_fingerprint, stored_scope, union_seeds, union_variants
from efficient_attn.sweeps.accuracy.groups import grouped_accuracy
from efficient_attn.sweeps.recall.config import Point, RecallConfig, points
from efficient_attn.sweeps.recall.report import write_outputs
from efficient_attn.sweeps.recall.state import state_floats

__all__ = ["run", "key_of", "accuracy_rows", "table_scope"]

# the module (the package's attribute ``run`` is the accuracy sweep's function of that name)
acc_run = importlib.import_module("efficient_attn.sweeps.accuracy.run")


def key_of(point: Point, seed: int) -> str:
    # a run on a mesh is a row of its own; without one the key is what it always was
    mesh = point.setting.train.mesh
    return ea_report.RowStore.make_key(point.variant, point.axis, point.value, seed,
                                       *((f"mesh={mesh}",) if mesh is not None else ()))


def accuracy_rows(path: Path) -> dict[tuple[str, int, str], dict]:
    """The finished MQAR rows of an accuracy RowStore with per-pair-count test accuracy, by
    (variant, seed, fingerprint); {} when there is none."""
    if not path.exists():
        return {}
    return {(r["variant"], r["seed"], r["fingerprint"]): r for r in ea_report.RowStore(path).rows()
            if r.get("task") == "mqar" and r.get("status") == "ok" and r.get("groups") and "mesh" not in r}


def _point_row(point: Point, seed: int, fp: str, seq_len: int, metric: str) -> dict:
    """What a point's row holds before its results: the point, its state, the model."""
    m = point.setting.model
    floats, kind = state_floats(point.variant, point.kwargs, num_heads=m.num_heads, head_dim=m.emb_dim // m.num_heads,
                                max_len=seq_len)
    return {"variant": point.variant, "family": get_spec(point.variant).family, "axis": point.axis,
            "value": point.value, "width": point.width, "variant_kwargs": dict(point.kwargs), "seed": seed,
            "status": "ok", "reason": "", "fingerprint": fp, "state_floats": floats, "state_kind": kind,
            "num_layers": m.num_layers, "seq_len": seq_len, "metric": metric, "model": dataclasses.asdict(m)}


def _from_accuracy(point: Point, seed: int, fp: str, acc_row: dict, seq_len: int, source: str) -> dict:
    """The recall row of ``point`` from the accuracy row of the same training."""
    row = dict(_point_row(point, seed, fp, seq_len, acc_row["metric"]), reused_from=source)
    for k in ("train", "test", "best_val", "best_step", "steps", "num_params", "tokens_per_s", "history", "groups",
              "wall_s", "cpu_s", "load_1min", "cores"):
        if k in acc_row:
            row[k] = acc_row[k]
    return row


def table_scope(cfg: RecallConfig, out: Path) -> RecallConfig:
    """The config the folder's table describes after ``cfg`` ran there: ``cfg``'s variants and
    seeds together with those of the table already in ``out`` (so a run of some variants keeps
    the others in the table; the accuracy sweep's ``stored_scope`` and unions)."""
    stored = stored_scope(out)
    if stored is None:
        return cfg
    return dataclasses.replace(cfg, variants=union_variants(cfg.variants, stored["variants"]),
                               seeds=union_seeds(cfg.seeds, stored["seeds"]))


def _stored_skips(out: Path) -> dict[str, str]:
    """The n/a reasons the measuring run wrote into ``out/rows.json`` ({} when absent)."""
    try:
        return {s["variant"]: s["reason"] for s in ea_report.read_stored_json(out).get("skipped") or []}
    except (KeyError, TypeError):
        return {}


def run(cfg: RecallConfig, out: str | Path, *, force: bool = False, progress: bool | None = None,
        log=print, reuse: str | Path | None = "default", report_only: bool = False) -> list[dict]:
    """Train every pending point of ``cfg``; write the outputs; return the stored rows.

    ``reuse``: an accuracy RowStore whose matching rows stand for points instead of training
    them (default: ``results/accuracy/<preset>/rows.jsonl`` beside ``out``'s results folder;
    None: train every point).
    ``force``: train the points ``cfg`` selects again (no reuse, checkpoints discarded); the
    stored rows of other variants and seeds stay, so one variant can be re-run after a fix.
    ``report_only``: train nothing, rebuild the outputs from the stored rows, for the variants and
    seeds the stored table had (unless ``cfg`` names its own) and with its n/a reasons."""
    if report_only and force:
        raise ValueError("recall: report_only=True re-renders the stored rows; it cannot be combined with force=True")
    out = Path(out)
    if report_only:
        stored = stored_scope(out)
        table = cfg
        if stored is not None:
            table = dataclasses.replace(
                cfg, variants=cfg.variants if cfg.variants is not None else (
                    None if stored["variants"] is None else tuple(stored["variants"])),
                seeds=tuple(stored["seeds"]))
        return write_outputs(out, ea_report.RowStore(out / "rows.jsonl").rows(), table, _stored_skips(out))
    if reuse == "default":
        reuse = out.parent.parent / "accuracy" / cfg.preset / "rows.jsonl"
    shared = {} if reuse is None or force else accuracy_rows(Path(reuse))
    table = table_scope(cfg, out)
    store = ea_report.RowStore(out / "rows.jsonl")  # a forced point's new row is appended over its old one
    variants = cfg.variant_names()
    for v in variants:
        get_spec(v)
    dfp = data_fingerprint(cfg.task, cfg.data_seed)
    info_path = out / "task_info.json"
    info = None
    if info_path.exists():  # keyed by the data's fingerprint: a stale entry is recomputed below
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError:
            info = None
    data = None
    skipped: dict[str, str] = {}
    todo = [(p, s) for v in variants for p in points(cfg, v) for s in cfg.seeds]
    runs_dir = acc_run.cache_root() / "runs" / "recall" / cfg.preset
    t_start = time.perf_counter()
    try:
        for count, (point, seed) in enumerate(todo, 1):
            fp = point.fingerprint(cfg.data_seed)
            prev = store.get(key_of(point, seed))
            if not force and prev is not None and prev.get("status") == "ok" and prev.get("fingerprint") == fp:
                continue
            if info is None or info.get("fingerprint") != dfp:
                data = acc_run.load_task(cfg.task, cfg.data_seed)
                info = dict(acc_run.task_info(data), fingerprint=dfp)
                ea_report.write_json(info_path, info)
            ok, reason = _plan(point.variant, info, cfg)
            if not ok:
                skipped[point.variant] = reason
                continue
            acc_row = shared.get((point.variant, seed, fp)) if point.setting.train.mesh is None else None
            if acc_row is not None:
                store.add(key_of(point, seed), _from_accuracy(point, seed, fp, acc_row, cfg.task.seq_len, str(reuse)))
                log(f"[{count}/{len(todo)}] {point.variant} {point.axis}={point.value} seed {seed}: acc "
                    f"{acc_row['test']:.3f} (the accuracy experiment's row, {reuse})")
                continue
            if data is None:
                data = acc_run.load_task(cfg.task, cfg.data_seed)
            row = _run_point(cfg, point, seed, data, info, fp, runs_dir, progress, force)
            store.add(key_of(point, seed), row)
            done = f"acc {row['test']:.3f}" if row["status"] == "ok" else f"ERROR {row['reason']}"
            log(f"[{count}/{len(todo)}] {point.variant} {point.axis}={point.value} seed {seed}: {done} "
                f"({row['wall_s']:.0f} s, total {time.perf_counter() - t_start:.0f} s)")
        if info is not None:
            for v in variants:
                ok, reason = _plan(v, info, cfg)
                if not ok:
                    skipped[v] = reason
    finally:
        rows = write_outputs(out, store.rows(), table, skipped)
    return rows


def _plan(variant: str, info: dict, cfg: RecallConfig) -> tuple[bool, str]:
    """The accuracy experiment's plan for the task, then its mesh plan (a sequence-parallel form
    when the mesh's "seq" axis has more than one device)."""
    if not get_spec(variant).capabilities.causal:  # the accuracy table runs it unmasked on MQAR; here it has no state
        return False, ("non-causal variant: it reads the whole sequence at once, so it keeps no state to produce the "
                       "next token from, which is this experiment's axis")
    ok, reason = acc_run.plan_for_task(variant, info)
    return acc_run.mesh_plan(variant, cfg.task) if ok else (ok, reason)


def _run_point(cfg: RecallConfig, point: Point, seed: int, data, info, fp, runs_dir, progress, force) -> dict:
    from efficient_attn.train import train

    setting = point.setting
    tcfg = dataclasses.replace(setting.train, seed=seed)
    row = dict(_point_row(point, seed, fp, data.seq_len, data.metric), train=tcfg.record())
    workdir = runs_dir / f"{point.variant}__{point.axis}{point.value}__s{seed}__{fp}"
    if force and workdir.exists():
        shutil.rmtree(workdir)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        model = acc_run.build_model(point.variant, point.kwargs, setting, data, seed)
        res = train(model, data, tcfg, workdir=workdir, metrics_path=workdir / "metrics.jsonl",
                    use_mask=info["needs_kv_mask"], progress=progress,
                    desc=f"{point.variant}/{point.axis}={point.value}/s{seed}",
                    checkpoint_interval_s=cfg.checkpoint_interval_s)
        name, groups = ea_tasks.eval_groups(data, data.test)
        scores = grouped_accuracy(res.model, data, data.test, groups, batch_size=tcfg.eval_batch,
                                  use_mask=info["needs_kv_mask"])
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # recorded and retried next time; the sweep goes on
        traceback.print_exc(file=sys.stderr)
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        row.update(status="error", reason=f"{type(err).__name__}: {msg}"[:300], wall_s=time.perf_counter() - t0,
                   test=None)
        return row
    row.update(test=res.test, best_val=res.best_val, best_step=res.best_step, steps=res.steps,
               num_params=res.num_params, tokens_per_s=res.tokens_per_s, history=res.history,
               groups={"name": name, "test": {str(g): a for g, a in scores.items()}},
               wall_s=res.wall_s + res.compile_s, cpu_s=time.process_time() - c0,
               load_1min=os.getloadavg()[0], cores=os.cpu_count())
    shutil.rmtree(workdir, ignore_errors=True)
    return row
