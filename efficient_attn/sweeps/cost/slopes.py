"""The interleaved slope check of the cost experiment: time slopes from ratios taken in one run.

The kernel sweep visits a series' lengths minutes apart (every variant at one length before
the next), so a window in which the machine runs slower (another process, a busy neighbour on a
shared host) lands on some lengths of a series and not on others, and tilts its fitted slope:
on the 2-core machine of the committed tables a point moved by up to 2x between two runs an
hour apart (results/cost/quick/NOTES.md). This check times each series' lengths round-robin in
one process (``exact.timing.time_interleaved``, the rounds of the exact and decode sweeps): every
length's program compiled and warmed up first, then ``rounds`` rounds of one call per length,
the order rotated each round, so that a slow window touches every length alike; the slope is
the log-log fit of the per-length medians.

It covers the variants that claim O(N) or O(N log N) time (``SlopesConfig.max_claim``): the
ones whose slope the tables hold to their claim. Rows of kind "slopes" in the cost RowStore,
one per (variant, pass, masking), keyed by the lengths and rounds; a rerun resumes. A series
is skipped, with the reason, where the kernel sweep did not measure one of its points (over a
budget), and once ``budget_s`` is spent (retried on a rerun).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax

import efficient_attn as ea
from efficient_attn import allocator, measure, report
from efficient_attn.sweeps.cost import point
from efficient_attn.sweeps.cost.budgets import claimed, is_done, point_budget
from efficient_attn.sweeps.cost.config import CostConfig
from efficient_attn.sweeps.cost.progress import progress_bar
from efficient_attn.sweeps.exact.timing import time_interleaved

__all__ = ["points", "row_key", "pending", "run_slopes", "measure_series"]


def points(cfg: CostConfig, variants: Sequence[str]) -> list[tuple[str, str, bool]]:
    """(variant, pass, masking) of every series the check times, mode by mode."""
    s = cfg.slopes
    if not s.enabled or not set(s.lengths) <= set(cfg.lengths):  # a run narrowed to other lengths
        return []
    longest = max(s.lengths)
    out = []
    for pass_ in s.passes:
        for causal in cfg.causal_modes:
            for name in variants:
                spec = ea.get_spec(name)
                claim = claimed(spec, "time")
                caps = spec.capabilities
                if claim is None or claim.slope_at(longest) > s.max_claim:
                    continue
                if caps.causal if causal else caps.bidirectional:
                    out.append((name, pass_, causal))
    return out


def row_key(p: tuple[str, str, bool], cfg: CostConfig) -> str:
    name, pass_, causal = p
    lengths = "-".join(str(n) for n in sorted(set(cfg.slopes.lengths)))
    return report.RowStore.make_key("slopes", name, pass_, "causal" if causal else "bidir", lengths,
                                    f"r{cfg.slopes.rounds}", cfg.batch, cfg.heads, cfg.head_dim, cfg.dtype)


def pending(cfg: CostConfig, variants: Sequence[str], store: report.RowStore) -> int:
    budget = point_budget(cfg)
    return sum(not is_done(store.get(row_key(p, cfg)), budget) for p in points(cfg, variants))


def _base_row(name: str, pass_: str, causal: bool, cfg: CostConfig) -> dict[str, Any]:
    spec = ea.get_spec(name)
    return {"kind": "slopes", "variant": name, "pass": pass_, "causal": causal, "status": "ok", "reason": "",
            "lengths": sorted(set(cfg.slopes.lengths)), "rounds": cfg.slopes.rounds,
            "claimed_time": spec.capabilities.time, "batch": cfg.batch, "heads": cfg.heads,
            "head_dim": cfg.head_dim, "dtype": cfg.dtype, "allocator": allocator.describe(),
            "medians_s": None, "mins_s": None, "maxs_s": None, "slope": None, "slope_r2": None,
            **point_budget(cfg)}


def _unmeasured(name: str, pass_: str, causal: bool, cfg: CostConfig, store: report.RowStore) -> str | None:
    """Why the sweep's own point at one of the lengths says this series cannot be run, or None."""
    for n in sorted(set(cfg.slopes.lengths)):
        row = store.get(point.row_key("cost", name, pass_, causal, n, cfg))
        if row is not None and row.get("status") != "ok":
            return f"the kernel sweep's N={n} point was not measured ({row.get('status')}: {row.get('reason')})"
    return None


def measure_series(name: str, pass_: str, causal: bool, cfg: CostConfig) -> dict[str, Any]:
    """One series timed interleaved; never raises for a variant's failure."""
    row = _base_row(name, pass_, causal, cfg)
    lengths = row["lengths"]
    try:
        programs = {}
        for n in lengths:
            fn, args = point.point_function(name, pass_, causal, n, cfg)
            compiled, compile_s = measure.compile_function(fn, *args)
            programs[f"N={n}"] = (compiled, args, compile_s)
        by_length = time_interleaved(programs, repeats=cfg.slopes.rounds, warmup=max(cfg.warmup, 1), settle=0)
        timings = [by_length[f"N={n}"] for n in lengths]
        medians = [t["median_s"] for t in timings]
        fit = measure.fit_loglog(lengths, medians)
        row.update(medians_s=medians, mins_s=[t["min_s"] for t in timings], maxs_s=[t["max_s"] for t in timings],
                   slope=None if fit is None else fit.slope, slope_r2=None if fit is None else fit.r2)
    except Exception as err:  # noqa: BLE001 - one variant's failure must not stop the check
        point.record_error(row, err)
    return row


def run_slopes(cfg: CostConfig, variants: Sequence[str], store: report.RowStore, *, force: bool = False,
               progress: bool = True) -> None:
    """Time every series of the check not already in ``store``."""
    todo = points(cfg, variants)
    budget = point_budget(cfg)
    bar = progress_bar(len(todo), progress, "slopes")
    t_start = time.perf_counter()
    try:
        for p in todo:
            name, pass_, causal = p
            key = row_key(p, cfg)
            bar.set_postfix_str(f"{name} {pass_}{' causal' if causal else ''}")
            if not force and is_done(store.get(key), budget):
                bar.update(1)
                continue
            spent = time.perf_counter() - t_start
            reason = _unmeasured(name, pass_, causal, cfg, store)
            if reason is None and cfg.slopes.budget_s is not None and spent > cfg.slopes.budget_s:
                reason = f"sweep budget: slopes budget_s={cfg.slopes.budget_s:g} s spent ({spent:.0f} s)"
            if reason is not None:
                row = _base_row(name, pass_, causal, cfg)
                row.update(status="skipped", reason=reason)
            else:
                jax.clear_caches()  # one series' programs at a time
                row = measure_series(name, pass_, causal, cfg)
            store.add(key, row)
            bar.update(1)
    finally:
        bar.close()
        point.module_state.cache_clear()
