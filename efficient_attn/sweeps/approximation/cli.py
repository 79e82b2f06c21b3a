"""``efficient-attn approx`` / ``experiments/approximation.py``: the approximation experiment's
command line. The shared flags come from ``efficient_attn.sweeps.cli``; this experiment adds
``--no-trained`` and ``--report-only``. Exit status 1 when a row errored, 2 for a bad flag."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

from efficient_attn.sweeps import cli
from efficient_attn.sweeps.approximation.presets import PRESETS
from efficient_attn.sweeps.approximation.run import run

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run a preset (or re-render it) into results/approximation/<preset>/; 1 when a row errored."""
    p = cli.experiment_parser("efficient-attn approx",
                              "Error of every attention variant against full attention, by budget.", presets=PRESETS)
    p.add_argument("--no-trained", action="store_true", help="skip input (b), the trained model's q, k, v")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the tables and pictures from the stored rows; measure nothing")
    args = cli.parse(p, argv)
    if args.report_only and args.force:
        p.error("--report-only: re-renders the stored rows, so it cannot be combined with --force")
    cfg = PRESETS[args.preset]()
    if args.variants is not None:
        cfg = dataclasses.replace(cfg, variants=args.variants)
    if args.no_trained:
        cfg = dataclasses.replace(cfg, trained=None)
    out = args.out or Path("results") / "approximation" / cfg.preset
    t0 = time.perf_counter()
    rows = run(cfg, out, force=args.force, progress=not args.no_progress, report_only=args.report_only)
    errors = [r for r in rows if r and r.get("status") == "error"]
    print(f"approximation ({cfg.preset}): {len(rows)} rows in {out} ({time.perf_counter() - t0:.0f} s)"
          + (f"; {len(errors)} errors" if errors else ""))
    # the shared status reads a row's "reason"; this experiment stores the exception as "error"
    return cli.exit_status([dict(r, reason=r.get("error")) for r in rows if r], "approximation")
