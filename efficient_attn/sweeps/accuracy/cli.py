"""``efficient-attn train`` / ``experiments/accuracy.py``: the accuracy experiment's command line.

The flags are the shared ones of ``efficient_attn.sweeps.cli`` (``--preset``, ``--variants``,
``--tasks``, ``--seeds``, ``--steps``, ``--plugin``, ``--force``, ``--out``, ``--no-progress``);
``--tasks`` must name tasks of the preset; ``--tasks``, ``--variants`` and ``--seeds`` narrow
what is trained, never what the folder's table shows (``config.widen_scope``); ``--report-only``
rebuilds the tables and plots from the stored rows and trains nothing (not with ``--force``).
``--workers N`` trains in N processes pinned to a core each (``sweeps.workers``; the same rows
up to float rounding, 1.6x the throughput of one process on 2 cores at the cpu preset's sizes). ``--mesh
data=2,seq=4`` trains every run on that device mesh (``TrainConfig.mesh``: the batch over "data", the attention sequence-parallel
over "seq"; a variant without a sequence-parallel form is n/a there). Its rows are rows of
their own (the mesh is in their fingerprint and key) and go by default to
``results/accuracy/<preset>_mesh_data2_seq4``, so the preset's own table is left alone. The
exit status is 2 for a bad flag (one line naming it), 1 when a row of this run's variants,
tasks and seeds errored, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Sequence

from efficient_attn.sweeps import cli, workers
from efficient_attn.sweeps.accuracy.config import AccuracyConfig, TaskSetting, stored_scope, widen_scope
from efficient_attn.sweeps.accuracy.presets import PRESETS
from efficient_attn.sweeps.accuracy.run import rows_of, run

__all__ = ["parse_args", "settings_from_args", "config_from_args", "default_out", "main"]

_PROG = "efficient-attn train"


def _parser() -> argparse.ArgumentParser:
    p = cli.experiment_parser(
        _PROG, "Accuracy of every attention variant on every task (LRA Table 1 analog).",
        presets=PRESETS, tasks=True, seeds=True, steps=True, mesh=True,
    )
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the tables and plots from the stored rows; train nothing")
    p.add_argument("--workers", type=cli.positive_int, default=1, metavar="N",
                   help="train in N processes, each pinned to its own core, sharing the units (default 1; "
                        "a width-64 model barely uses a second core: 2 workers on 2 cores trained 1.6x the tokens)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set by --workers for its children
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed flags (``--plugin`` files loaded, ``--variants`` checked); exits 2 on a bad one."""
    return cli.parse(_parser(), argv)


def _names(value) -> tuple[str, ...] | None:
    # the shared parser gives tuples; a Namespace built by hand may still hold "a,b" strings
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(x.strip() for x in value.split(",") if x.strip())
    return tuple(value)


def _refuse(parser: argparse.ArgumentParser | None, message: str):
    if parser is not None:
        parser.error(message)
    raise SystemExit(f"{_PROG}: error: {message}")


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> AccuracyConfig:
    """The preset with the flags that change a setting (``--steps``, ``--mesh``), every task kept."""
    cfg = PRESETS[args.preset]()
    steps = getattr(args, "steps", None)
    if steps is not None:
        if not isinstance(steps, int) or steps < 1:
            _refuse(parser, f"--steps: expected a positive integer, got {steps!r}")

        def shorter(s: TaskSetting) -> TaskSetting:
            tr = s.train
            tr = dataclasses.replace(tr, steps=steps, eval_every=min(tr.eval_every, steps),
                                     warmup=min(tr.warmup, max(0, steps - 1)))
            return dataclasses.replace(s, train=tr)

        cfg = dataclasses.replace(cfg, tasks=tuple(shorter(t) for t in cfg.tasks))
    mesh = getattr(args, "mesh", None)
    if mesh is not None:
        try:
            cfg = dataclasses.replace(cfg, tasks=tuple(
                dataclasses.replace(t, train=dataclasses.replace(t.train, mesh=mesh)) for t in cfg.tasks))
        except ValueError as err:  # an axis train does not know, a batch the data axis does not divide
            _refuse(parser, f"--mesh {mesh}: {err}")
        problem = cli.mesh_device_problem(cfg.tasks[0].train.mesh)  # (parse checked it already for main)
        if problem:
            _refuse(parser, problem)
    return cfg


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> AccuracyConfig:
    """What this invocation trains: the preset with the flags' settings (``settings_from_args``),
    narrowed to the ``--tasks``, ``--variants`` and ``--seeds`` named; a bad value exits with one
    line naming its flag."""
    return narrowed(settings_from_args(args, parser), args, parser)


def narrowed(cfg: AccuracyConfig, args: argparse.Namespace, parser: argparse.ArgumentParser | None = None
             ) -> AccuracyConfig:
    """``cfg`` narrowed to the ``--tasks``, ``--variants`` and ``--seeds`` named."""
    tasks = _names(getattr(args, "tasks", None))
    if tasks is not None:
        known = [t.task for t in cfg.tasks]
        if not tasks:
            _refuse(parser, "--tasks: expected at least one comma-separated name")
        bad = [t for t in tasks if t not in known]
        if bad:
            _refuse(parser, f"--tasks: unknown task(s) {', '.join(bad)}; the {args.preset} preset has {', '.join(known)}")
        cfg = dataclasses.replace(cfg, tasks=tuple(t for t in cfg.tasks if t.task in tasks))
    variants = _names(getattr(args, "variants", None))
    if variants is not None:
        if not variants:
            _refuse(parser, "--variants: expected at least one comma-separated name")
        cfg = dataclasses.replace(cfg, variants=variants)
    seeds = _names(getattr(args, "seeds", None))
    if seeds is not None:
        try:
            seeds = tuple(int(s) for s in seeds)
        except ValueError:
            seeds = ()
        if not seeds or min(seeds) < 0:
            _refuse(parser, f"--seeds: expected comma-separated non-negative integers, got {args.seeds!r}")
        cfg = dataclasses.replace(cfg, seeds=seeds)
    return cfg


def default_out(cfg: AccuracyConfig) -> Path:
    """``results/accuracy/<preset>``; a run on a mesh gets ``<preset>_mesh_<axes>`` beside it."""
    name = cli.mesh_folder(cfg.preset, (t.train.mesh for t in cfg.tasks))
    return Path("results") / "accuracy" / name


def _child_argv(argv: Sequence[str] | None, out: Path) -> list[str]:
    """A worker's command: this one without ``--workers``, with ``--out`` fixed."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--workers" or a == "--out":
            skip = True
            continue
        if a.startswith("--workers=") or a.startswith("--out="):
            continue
        kept.append(a)
    return [sys.executable, "-m", "efficient_attn.sweeps.accuracy", *kept, "--out", str(out)]


def main(argv: Sequence[str] | None = None) -> int:
    """Train what is pending at a preset, write results/accuracy/<preset>/; 1 when a row errored."""
    p = _parser()
    args = cli.parse(p, argv)
    if args.worker is not None:  # before jax starts: XLA sizes its thread pool from the cores it may use
        workers.pin_to_core(args.worker)
    settings = settings_from_args(args, p)
    cfg = narrowed(settings, args, p)
    if args.report_only and args.force:
        p.error("--report-only: re-renders the stored rows, so it cannot be combined with --force")
    if args.workers > 1 and (args.force or args.report_only or args.mesh is not None):
        p.error("--workers: trains in several processes pinned to a core each; not with --force (retrain with "
                "one), --report-only or --mesh")
    out = Path(args.out or default_out(cfg))
    # --tasks/--variants/--seeds narrow what is trained, not what the folder's table shows
    table = widen_scope(cfg, stored_scope(out), settings.tasks)
    t0 = time.perf_counter()
    worker_status = None
    if args.workers > 1:
        codes = workers.run_workers(args.workers, _child_argv(argv, out))
        worker_status = workers.exit_status(codes)
        if worker_status == 2:
            return 2
        if worker_status is not None:
            print(f"accuracy: workers ended with {codes}: the table below is rebuilt from the rows they stored; "
                  "rerun the same command to resume", file=sys.stderr)
    try:
        rows = run(cfg, out, table=table, force=args.force, worker=args.worker,
                   progress=False if args.no_progress or args.worker is not None else None,
                   report_only=args.report_only or args.workers > 1,
                   log=print if args.worker is None else (lambda m: print(f"[worker {args.worker}] {m}", flush=True)))
    except KeyboardInterrupt:
        print(f"\naccuracy: interrupted; finished rows are kept in {out / 'rows.jsonl'} and the tables were "
              "rebuilt from them; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    mine = rows_of(cfg, rows)
    errors = [r for r in mine if r.get("status") == "error"]
    print(f"accuracy ({cfg.preset}): {len(rows)} rows in {out} ({time.perf_counter() - t0:.0f} s)"
          + (f"; {len(errors)} errors" if errors else ""))
    status = cli.exit_status(mine, "accuracy")
    return worker_status if worker_status is not None else status
