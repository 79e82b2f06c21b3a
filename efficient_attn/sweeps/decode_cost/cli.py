"""``experiments/decode_cost.py``: the decode-cost experiment's command line.

The shared flags come from ``efficient_attn.sweeps.cli``; this experiment adds the shape
(``--lengths`` = the contexts, ``--batches``, ``--heads``, ``--head-dim``, ``--steps``),
``--sweep-budget`` and ``--report-only`` (rebuild the tables from the stored rows, measure
nothing). The exit status is 1 when a row of the run errored, 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import efficient_attn as ea
from efficient_attn.sweeps import cli
from efficient_attn.sweeps.decode_cost.config import DecodeCostConfig
from efficient_attn.sweeps.decode_cost.presets import PRESETS
from efficient_attn.sweeps.decode_cost.run import rows_of, run

__all__ = ["parse_args", "config_from_args", "main"]

_PROG = "experiments/decode_cost.py"


def _parser() -> argparse.ArgumentParser:
    p = cli.experiment_parser(
        _PROG,
        "Decoding cost of every decode-capable variant: per-token step latency and state / cache "
        "memory against the context length, slopes, and the context from which each is faster than full's KV cache.",
        presets=PRESETS,
    )
    p.add_argument("--lengths", type=cli.int_list("--lengths", minimum=1), metavar="N,M",
                   help="comma-separated context lengths, e.g. 1024,4096")
    p.add_argument("--batches", type=cli.int_list("--batches", minimum=1), metavar="1,8")
    p.add_argument("--heads", type=cli.positive_int)
    p.add_argument("--head-dim", type=cli.positive_int)
    p.add_argument("--steps", type=cli.positive_int, metavar="S", help="steps per timed call")
    p.add_argument("--sweep-budget", type=cli.positive_float, metavar="SECONDS",
                   help="seconds after which remaining points are skipped")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the tables and the plot from the stored rows; measure nothing")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed flags (``--plugin`` files loaded, ``--variants`` checked); exits 2 on a bad one."""
    p = _parser()
    args = cli.parse(p, argv)
    if args.report_only and args.force:
        p.error("--report-only: re-renders the stored rows, so it cannot be combined with --force")
    for name in args.variants or ():
        if not ea.get_spec(name).capabilities.decode:
            able = [n for n in ea.list_variants() if ea.get_spec(n).capabilities.decode]
            p.error(f"--variants: {name!r} cannot decode (capabilities.decode=False); variants that can: "
                    f"{', '.join(able)}")
    return args


def config_from_args(args: argparse.Namespace) -> DecodeCostConfig:
    """The preset with the flags' overrides; a value the config refuses raises ValueError."""
    cfg = PRESETS[args.preset]
    changes: dict[str, Any] = {}
    for field, value in (("variants", args.variants), ("contexts", args.lengths), ("batches", args.batches),
                         ("heads", args.heads), ("head_dim", args.head_dim), ("steps_per_call", args.steps),
                         ("sweep_budget_s", args.sweep_budget)):
        if value is not None:
            changes[field] = value
    return dataclasses.replace(cfg, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a preset (or re-render it) into results/decode_cost/<preset>/; 1 when a row errored."""
    p = _parser()
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        p.error(str(err.args[0] if err.args else err))
    out = Path(args.out) if args.out else Path("results") / "decode_cost" / cfg.preset
    t0 = time.perf_counter()
    try:
        store = run(cfg, out, force=args.force, progress=not args.no_progress, report_only=args.report_only)
    except KeyboardInterrupt:
        print(f"\ndecode_cost: interrupted; finished rows are kept in {out / 'rows.jsonl'} and the tables were "
              "rebuilt from them; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    rows = rows_of(cfg, store)
    counts = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "error")}
    print(f"decode_cost: {len(rows)} rows ({counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} errors) "
          f"in {time.perf_counter() - t0:.0f} s -> {out}/table.md", file=sys.stderr)
    return cli.exit_status(rows, "decode_cost")
