"""``experiments/recall.py``: the recall sweep's command line (the shared flags of
``efficient_attn.sweeps.cli``: ``--preset``, ``--variants``, ``--seeds``, ``--steps``,
``--plugin``, ``--force``, ``--out``, ``--no-progress``, ``--mesh``). Exit status 2 for a bad
flag, 1 when a row of this run errored, else 0.

``--mesh data=2,seq=4`` trains every point on that device mesh (``TrainConfig.mesh``, as the
accuracy experiment's ``--mesh``): its rows are rows of their own (the mesh is in their key and
fingerprint) and go by default to ``results/recall/<preset>_mesh_data2_seq4``; a variant with
no sequence-parallel form is skipped with the reason when "seq" has more than one device."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from efficient_attn.sweeps import cli
from efficient_attn.sweeps.recall.config import RecallConfig
from efficient_attn.sweeps.recall.presets import PRESETS
from efficient_attn.sweeps.recall.run import run

__all__ = ["parse_args", "config_from_args", "default_out", "main"]

_PROG = "experiments/recall.py"


def _parser():
    p = cli.experiment_parser(_PROG, "MQAR recall against the state each variant keeps.",
                              presets=PRESETS, seeds=True, steps=True, mesh=True)
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the table and plot from the stored rows; train nothing")
    return p


def parse_args(argv: Sequence[str] | None):
    """The parsed flags (``--plugin`` files loaded, ``--variants`` checked); exits 2 on a bad one."""
    return cli.parse(_parser(), argv)


def config_from_args(args) -> RecallConfig:
    """The preset with the flags' overrides; a value the configs refuse raises ValueError."""
    cfg = PRESETS[args.preset]()
    if args.variants is not None:
        cfg = dataclasses.replace(cfg, variants=args.variants)
    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=args.seeds)
    if args.steps is not None:
        tr = cfg.task.train
        tr = dataclasses.replace(tr, steps=args.steps, eval_every=min(tr.eval_every, args.steps),
                                 warmup=min(tr.warmup, args.steps - 1))
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, train=tr))
    if getattr(args, "mesh", None) is not None:
        try:  # an axis train does not know, a batch the data axis does not divide
            train = dataclasses.replace(cfg.task.train, mesh=args.mesh)
        except ValueError as err:
            raise ValueError(f"--mesh {args.mesh}: {err}") from None
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, train=train))
        problem = cli.mesh_device_problem(train.mesh)
        if problem:
            raise ValueError(problem)
    return cfg


def default_out(cfg: RecallConfig) -> Path:
    """``results/recall/<preset>``; a run on a mesh gets ``<preset>_mesh_<axes>`` beside it."""
    return Path("results") / "recall" / cli.mesh_folder(cfg.preset, [cfg.task.train.mesh])


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = cli.parse(p, argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:  # one line naming what the configs refused, exit 2, before any training
        p.error(str(err.args[0] if err.args else err))
    if args.report_only and args.force:
        p.error("--report-only: re-renders the stored rows, so it cannot be combined with --force")
    out = args.out or default_out(cfg)
    try:
        rows = run(cfg, out, force=args.force, progress=False if args.no_progress else None,
                   report_only=args.report_only)
    except KeyboardInterrupt:
        print(f"\nrecall: interrupted; finished rows are kept in {out / 'rows.jsonl'}; rerun to resume", file=sys.stderr)
        raise SystemExit(130) from None
    wanted = set(cfg.variant_names())
    mine = [r for r in rows if r.get("variant") in wanted and r.get("seed") in cfg.seeds]
    print(f"recall ({cfg.preset}): {len(rows)} rows in {out}")
    return cli.exit_status(mine, "recall")
