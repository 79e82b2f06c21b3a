"""The decode-cost experiment's analysis of stored rows: series, slopes, ratios, crossovers.

Nothing here measures. The baseline is the registry's exact reference (``full``): softmax
attention over a KV cache. Per (variant, batch):

    state      "fixed" when the state's bytes are the same at every context, else "grows"
    slope      least-squares slope of log(step time) on log(context) (0: flat, 1: linear)
    growth     step time at the longest measured context / at the shortest
    speed-up   baseline step time / the variant's, at the longest context both measured
    crossover  the context from which the variant's step is faster than the baseline's at
               every longer measured context (``measure.crossover``; interpolated in log N)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from efficient_attn import measure, registry

__all__ = ["baseline", "Summary", "series", "summarise"]


def baseline() -> str:
    """The registry's ground truth of every exact path (``full``): the KV-cache reference."""
    return registry.exact_reference()


@dataclasses.dataclass(frozen=True)
class Summary:
    """What the tables say about one (variant, batch) series."""

    variant: str
    batch: int
    state: str  # "fixed" or "grows"
    step_s: dict  # context -> median step seconds (ok points)
    state_bytes: dict  # context -> bytes (every point)
    slope: measure.Fit | None
    memory_slope: measure.Fit | None
    growth: float | None
    growth_span: tuple[int, int] | None
    speedup: float | None
    speedup_at: int | None
    crossover: measure.Crossover | None


def series(rows: Sequence[dict]) -> dict[tuple[str, int], dict[int, dict]]:
    """(variant, batch) -> context -> row."""
    out: dict[tuple[str, int], dict[int, dict]] = {}
    for r in rows:
        out.setdefault((r["variant"], r["batch"]), {})[r["context"]] = r
    return out


def _ok(r: dict | None) -> float | None:
    return r.get("step_median_s") if r and r.get("status") == "ok" else None


def summarise(rows: Sequence[dict], base: str | None = None) -> list[Summary]:
    base = baseline() if base is None else base
    groups = series(rows)
    out = []
    for (name, batch), by_n in groups.items():
        ns = sorted(by_n)
        step = {n: _ok(by_n[n]) for n in ns if _ok(by_n[n])}
        mem = {n: by_n[n].get("state_bytes") for n in ns if by_n[n].get("state_bytes")}
        fixed = len(set(mem.values())) == 1
        slope = measure.fit_loglog(list(step), list(step.values()))
        memory_slope = measure.fit_loglog(list(mem), list(mem.values()))
        growth = span = None
        if len(step) >= 2:
            lo, hi = min(step), max(step)
            growth, span = step[hi] / step[lo], (lo, hi)
        base_by_n = groups.get((base, batch), {})
        both = [n for n in step if _ok(base_by_n.get(n))]
        speedup = at = cross = None
        if both and name != base:
            at = max(both)
            speedup = _ok(base_by_n[at]) / step[at]
            cross = measure.crossover(both, [step[n] for n in both], [_ok(base_by_n[n]) for n in both])
        out.append(Summary(name, batch, "fixed" if fixed else "grows", step, mem, slope, memory_slope,
                           growth, span, speedup, at, cross))
    return out
