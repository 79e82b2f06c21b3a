"""The flatness check of the fixed-state decoders: one step program timed on the state at the
shortest and at the longest context in the same interleaved rounds.

A fixed-state variant's step is one compiled program at every context (the state's shapes do
not change with it; its position is a traced value), so the sweep's per-point medians,
measured minutes apart, differ only by how the machine drifted between them. At 15-50 us per
token that drift (the KV-cache points' gigabyte states evicting the CPU caches in between,
the clock) moved single points by up to 1.9x in the first cpu run with no trend in the
context (results/decode_cost/cpu/NOTES.md). Here the two states go through the same compiled
program in alternating calls, the order rotated each round (``sweeps.exact.timing``), so the
ratio of the two medians is the step's growth from the first to the last context with the
drift falling on both alike. One row per (variant, batch) whose state is fixed.
"""

from __future__ import annotations

from typing import Any, Sequence

import efficient_attn as ea
from efficient_attn import report
from efficient_attn.sweeps.decode_cost import point
from efficient_attn.sweeps.decode_cost.config import DecodeCostConfig
from efficient_attn.sweeps.exact.timing import time_interleaved

__all__ = ["is_fixed", "units", "row_key", "measure_growth"]


def is_fixed(name: str, cfg: DecodeCostConfig) -> bool:
    """Whether ``name``'s decoding state has the same bytes at the shortest and longest context."""
    lo, hi = min(cfg.contexts), max(cfg.contexts)
    return point.state_bytes(name, 1, lo, cfg) == point.state_bytes(name, 1, hi, cfg)


def units(cfg: DecodeCostConfig, variants: Sequence[str]) -> list[tuple[str, int]]:
    """(variant, batch) of every fixed-state variant, when the config has two contexts and rounds."""
    if cfg.growth_rounds == 0 or len(set(cfg.contexts)) < 2:
        return []
    fixed = [name for name in variants if is_fixed(name, cfg)]
    return [(name, batch) for batch in sorted(set(cfg.batches)) for name in fixed]


def row_key(name: str, batch: int, cfg: DecodeCostConfig) -> str:
    return report.RowStore.make_key("decode_growth", name, batch, min(cfg.contexts), max(cfg.contexts), cfg.heads,
                                    cfg.head_dim, cfg.dtype, cfg.steps_per_call, f"rounds={cfg.growth_rounds}")


def measure_growth(name: str, batch: int, cfg: DecodeCostConfig) -> dict[str, Any]:
    """The interleaved row of one (variant, batch); a failure becomes an "error" row."""
    lo, hi = min(cfg.contexts), max(cfg.contexts)
    row: dict[str, Any] = {"kind": "growth", "variant": name, "family": ea.get_spec(name).family, "batch": batch,
                           "shortest": lo, "longest": hi, "heads": cfg.heads, "head_dim": cfg.head_dim,
                           "dtype": cfg.dtype, "steps_per_call": cfg.steps_per_call, "rounds": cfg.growth_rounds,
                           "environment": report.row_environment(cfg.preset)}
    try:
        m = point.module(name, cfg.heads, cfg.head_dim, cfg.max_len, cfg.seed)
        compiled, compile_s, params = point.compiled_step(name, batch, cfg.max_len, cfg)
        programs = {}
        for label, context in (("shortest", lo), ("longest", hi)):
            dstate, tokens = point.step_arguments(m, batch, cfg.max_len, context, cfg)
            programs[label] = (compiled, (params, dstate, *tokens), compile_s)
        timings = time_interleaved(programs, repeats=cfg.growth_rounds, warmup=1, settle=0)
        steps = cfg.steps_per_call
        row.update(status="ok", step_shortest_s=timings["shortest"]["median_s"] / steps,
                   step_longest_s=timings["longest"]["median_s"] / steps,
                   growth=timings["longest"]["median_s"] / timings["shortest"]["median_s"], compile_s=compile_s)
    except Exception as err:  # noqa: BLE001 -- one broken variant must not stop the sweep
        row.update(status="error", reason=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return row
