"""``efficient-attn bench`` / ``experiments/cost_scaling.py``: the cost experiment's command line.

The shared flags come from ``efficient_attn.sweeps.cli``; this experiment adds the shape
(``--lengths``, ``--batch``, ``--heads``, ``--head-dim``, ``--passes``), ``--no-interface``,
``--no-table2``, ``--sweep-budget`` and ``--report-only`` (rebuild the tables from the stored
rows, measure nothing; with the config the run stored, so a narrowed run stays narrowed). The exit status is 1 when a row of the run errored, 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from efficient_attn import report
from efficient_attn.sweeps import cli
from efficient_attn.sweeps.cost.config import PASSES, CostConfig, config_from_dict
from efficient_attn.sweeps.cost.presets import PRESETS
from efficient_attn.sweeps.cost.run import rows_of, run

__all__ = ["parse_args", "config_from_args", "main"]

_PROG = "efficient-attn bench"


def _parser() -> argparse.ArgumentParser:
    p = cli.experiment_parser(
        _PROG,
        "Cost of every attention variant against the sequence length: time, memory, FLOPs, "
        "slopes and crossovers against the exact baselines, and the LRA Table 2 analog.",
        presets=PRESETS,
    )
    p.add_argument("--lengths", type=cli.int_list("--lengths", minimum=1), metavar="N,M",
                   help="comma-separated sequence lengths, e.g. 256,512,1024")
    p.add_argument("--batch", type=cli.positive_int)
    p.add_argument("--heads", type=cli.positive_int)
    p.add_argument("--head-dim", type=cli.positive_int)
    p.add_argument("--passes", type=cli.name_list("--passes"), metavar="fwd,fwd_bwd",
                   help="comma-separated subset of fwd,fwd_bwd")
    p.add_argument("--no-interface", action="store_true",
                   help="skip the interface part (grouped-query heads, packed against padded batches)")
    p.add_argument("--no-table2", action="store_true", help="skip the LRA Table 2 analog")
    p.add_argument("--sweep-budget", type=cli.positive_float, metavar="SECONDS",
                   help="seconds after which remaining points are skipped")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the tables and plots from the stored rows, with the config the run "
                        "stored in rows.json unless a flag above overrides it; measure nothing")
    return p


def _parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = cli.parse(p, argv)
    if args.passes is not None:
        cli.check_choices(p, "--passes", args.passes, PASSES, what="pass")
    if args.report_only and args.force:
        p.error("--report-only: re-renders the stored rows, so it cannot be combined with --force")
    return args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed flags (``--plugin`` files loaded, ``--variants`` checked); exits 2 on a bad one."""
    return _parse(_parser(), argv)


def config_from_args(args: argparse.Namespace) -> CostConfig:
    """The preset with the flags' overrides; a value the config refuses raises ValueError."""
    cfg = PRESETS[args.preset]
    changes: dict[str, Any] = {}
    for field, value in (("variants", args.variants), ("lengths", args.lengths), ("passes", args.passes),
                         ("batch", args.batch), ("heads", args.heads), ("head_dim", args.head_dim),
                         ("sweep_budget_s", args.sweep_budget)):
        if value is not None:
            changes[field] = value
    if args.no_interface:
        changes["interface"] = dataclasses.replace(cfg.interface, enabled=False)
    if args.no_table2:
        changes["table2"] = dataclasses.replace(cfg.table2, enabled=False)
    return dataclasses.replace(cfg, **changes)


_CONFIG_FLAGS = ("variants", "lengths", "passes", "batch", "heads", "head_dim", "sweep_budget", "no_interface",
                 "no_table2")


def stored_config(out: Path, preset: str) -> CostConfig | None:
    """The config the measuring run wrote into ``out/rows.json``, when it is this preset's."""
    stored = report.read_stored_json(out).get("config")
    if not isinstance(stored, dict) or stored.get("preset") != preset:
        return None
    return config_from_dict(stored)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a preset (or re-render it), write results/cost/<preset>/; 1 when a row errored."""
    p = _parser()
    args = _parse(p, argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        p.error(str(err.args[0] if err.args else err))
    out = Path(args.out) if args.out else Path("results") / "cost" / cfg.preset
    if args.report_only and not any(getattr(args, f) not in (None, False) for f in _CONFIG_FLAGS):
        # a narrowed run (--variants, --lengths, ...) is re-rendered as it was run, not as the preset
        try:
            cfg = stored_config(out, cfg.preset) or cfg
        except (TypeError, ValueError) as err:
            p.error(f"--report-only: {out / 'rows.json'} holds a config this code cannot read ({err}); "
                    "pass the run's flags (--variants, --lengths, ...) to re-render it")
    t0 = time.perf_counter()
    try:
        store = run(cfg, out, force=args.force, progress=not args.no_progress, report_only=args.report_only)
    except KeyboardInterrupt:
        print(f"\ncost: interrupted; finished rows are kept in {out / 'rows.jsonl'} and the tables were "
              "rebuilt from them; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    counts = {s: sum(r.get("status") == s for r in store.rows()) for s in ("ok", "skipped", "error")}
    print(f"cost: {len(store)} rows ({counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} errors) "
          f"in {time.perf_counter() - t0:.0f} s -> {out}/table.md", file=sys.stderr)
    return cli.exit_status(rows_of(cfg, store), "cost")
