"""``experiments/bench_exact.py`` and ``experiments/bench_encoder.py``: the exact experiment's
command lines.

The shared flags come from ``efficient_attn.sweeps.cli`` (``--preset``, ``--plugin``,
``--force``, ``--out``, ``--no-progress``; ``--variants`` is refused: the implementations
compared are fixed). Each part adds its shape flags and ``--report-only`` (rebuild the table
from the stored rows, measure nothing). The kernel benchmark keeps its earlier flags:
``--lengths 1024 2048`` (or ``1024,2048``), ``--huge`` (the same as ``--preset huge``);
``--preset peers`` times blockwise against the JAX peers (``peers.py``). The
exit status is 1 when a row of the run errored, 2 for a bad flag, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from efficient_attn.sweeps import cli
from efficient_attn.sweeps.exact import encoder, presets
from efficient_attn.sweeps.exact import run as run_
from efficient_attn.sweeps.exact.config import IMPLS

__all__ = ["parse_args", "config_from_args", "main", "encoder_parse_args", "encoder_config_from_args",
           "encoder_main", "default_out"]

_PROG = "experiments/bench_exact.py"
_ENCODER_PROG = "experiments/bench_encoder.py"


def _parser() -> argparse.ArgumentParser:
    p = cli.experiment_parser(
        _PROG,
        "Exact attention side by side: full, blockwise and jax.nn.dot_product_attention, forward and "
        "forward+backward time against N, compiled memory, causal against non-causal (one row per unit, resumable). "
        "--preset peers: blockwise against the JAX peers (tokamax, memory-efficient-attention, ringattention; "
        "the optional extra: pip install -e '.[peers]', or make bench-peers) into results/exact/peers.",
        presets=presets.PRESETS,
    )
    p.add_argument("--lengths", type=cli.int_list("--lengths", minimum=1), nargs="+", metavar="N",
                   help="lengths of the time rows: 1024 2048 or 1024,2048")
    p.add_argument("--batch", type=cli.positive_int)
    p.add_argument("--heads", type=cli.positive_int)
    p.add_argument("--head-dim", type=cli.positive_int)
    p.add_argument("--repeats", type=cli.positive_int, help="timed interleaved rounds per row")
    p.add_argument("--memory-n", type=cli.positive_int, help="N of the compile-only memory row")
    p.add_argument("--causal-n", type=cli.positive_int, help="N of the causal against non-causal row")
    p.add_argument("--huge", action="store_true",
                   help="also run blockwise forward+backward at N=65536: the same as --preset huge")
    p.add_argument("--report-only", action="store_true", help="rebuild the table from the stored rows; measure nothing")
    return p


def _check_common(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.variants is not None:
        p.error(f"--variants: this experiment compares fixed implementations ({', '.join(IMPLS)}) and takes no "
                "variant names; leave the flag out")
    if args.report_only and args.force:
        p.error("--report-only: re-renders the stored rows, so it cannot be combined with --force")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed flags (``--plugin`` files loaded); exits 2 on a bad one."""
    p = _parser()
    args = cli.parse(p, argv)
    _check_common(p, args)
    if args.huge:  # the flag reproduce.py and users passed before presets existed
        args.preset = "huge"
    if args.lengths is not None:
        args.lengths = tuple(dict.fromkeys(n for part in args.lengths for n in part))
    return args


def _replace(cfg: Any, changes: dict[str, Any]) -> Any:
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})


def config_from_args(args: argparse.Namespace):
    """The preset with the flags' overrides; a value the config refuses raises ValueError."""
    return _replace(presets.PRESETS[args.preset](), {
        "lengths": args.lengths, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
        "repeats": args.repeats, "memory_n": args.memory_n, "causal_n": args.causal_n})


def default_out(part: str, preset: str) -> Path:
    """results/exact (quick) or results/exact/<preset> for the kernels, results/exact/encoder for the encoder."""
    base = Path("results") / "exact"
    if part == "encoder":
        return base / "encoder" if preset == "quick" else base / "encoder" / preset
    return base if preset == "quick" else base / preset


def _main(p: argparse.ArgumentParser, args: argparse.Namespace, make_config: Callable, part: str, run: Callable,
          rows_of: Callable, name: str) -> int:
    try:
        cfg = make_config(args)
    except ValueError as err:
        p.error(str(err.args[0] if err.args else err))
    out = Path(args.out) if args.out else default_out(part, cfg.preset)
    try:
        store = run(cfg, out, force=args.force, report_only=args.report_only)
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; finished rows are kept in {out / 'rows.jsonl'} and the table was rebuilt from "
              "them; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    rows = rows_of(cfg, store)
    counts = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "error")}
    print(f"{name}: {len(rows)} rows ({counts['ok']} ok, {counts['error']} errors) -> {out}/table.md", file=sys.stderr)
    return cli.exit_status(rows, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the kernel benchmark's preset (or re-render it) into results/exact/; 1 when a row errored."""
    return _main(_parser(), parse_args(argv), config_from_args, "kernels", run_.run, run_.rows_of, "exact")


def _encoder_parser() -> argparse.ArgumentParser:
    p = cli.experiment_parser(
        _ENCODER_PROG,
        "Throughput of the full encoder (blockwise kernel and einsum) against the same model on "
        "flax.nnx.MultiHeadAttention: training and forward tokens per second.",
        presets=presets.ENCODER_PRESETS,
    )
    for flag, what in (("--length", "tokens per sequence"), ("--batch", "sequences per step"),
                       ("--layers", "encoder blocks"), ("--emb", "model width"), ("--heads", "attention heads"),
                       ("--repeats", "timed interleaved rounds")):
        p.add_argument(flag, type=cli.positive_int, help=what)
    p.add_argument("--report-only", action="store_true", help="rebuild the table from the stored row; measure nothing")
    return p


def encoder_parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _encoder_parser()
    args = cli.parse(p, argv)
    _check_common(p, args)
    if args.out is not None and args.out.suffix == ".json":
        p.error(f"--out: a directory now (its rows.jsonl, rows.json and table.md), got the file {args.out}; "
                f"give its folder, e.g. --out {args.out.with_suffix('')}")
    return args


def encoder_config_from_args(args: argparse.Namespace):
    return _replace(presets.ENCODER_PRESETS[args.preset](), {
        "length": args.length, "batch": args.batch, "layers": args.layers, "emb": args.emb, "heads": args.heads,
        "repeats": args.repeats})


def encoder_main(argv: Sequence[str] | None = None) -> int:
    """Run the encoder throughput row (or re-render it) into results/exact/encoder/; 1 when it errored."""
    return _main(_encoder_parser(), encoder_parse_args(argv), encoder_config_from_args, "encoder", encoder.run,
                 encoder.rows_of, "exact encoder")
