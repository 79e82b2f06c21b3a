"""``experiments/recall.py``: the recall sweep's command line (the shared flags of
``efficient_attn.sweeps.cli``: ``--preset``, ``--variants``, ``--seeds``, ``--steps``,
``--plugin``, ``--force``, ``--out``, ``--no-progress``). Exit status 2 for a bad flag, 1 when a
row of this run errored, else 0."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from efficient_attn.sweeps import cli
from efficient_attn.sweeps.recall.presets import PRESETS
from efficient_attn.sweeps.recall.run import run

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.experiment_parser("experiments/recall.py", "MQAR recall against the state each variant keeps.",
                              presets=PRESETS, seeds=True, steps=True)
    args = cli.parse(p, argv)
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
    out = args.out or Path("results") / "recall" / cfg.preset
    try:
        rows = run(cfg, out, force=args.force, progress=False if args.no_progress else None)
    except KeyboardInterrupt:
        print(f"\nrecall: interrupted; finished rows are kept in {out / 'rows.jsonl'}; rerun to resume", file=sys.stderr)
        raise SystemExit(130) from None
    wanted = set(cfg.variant_names())
    mine = [r for r in rows if r.get("variant") in wanted and r.get("seed") in cfg.seeds]
    print(f"recall ({cfg.preset}): {len(rows)} rows in {out}")
    return cli.exit_status(mine, "recall")
