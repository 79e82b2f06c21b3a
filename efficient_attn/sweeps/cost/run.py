"""The cost sweep: every (variant, pass, masking, N) point of a config, measured into a RowStore,
then the interface part (``interface``: grouped-query heads, packed against padded), the
fixed-token control (``tokens``), the interleaved slope check (``slopes``) and the LRA Table 2
analog (``table2``), into the same store.

Each finished point is appended to ``out/rows.jsonl`` as it completes, so a rerun resumes
(``force`` measures the selected points again); the tables are rebuilt from the store
(``report.write_outputs``) at the end, on an error and on Ctrl-C. A point over a budget is
stored as skipped with the reason, an exception as an error; neither stops the sweep. A run
with nothing left to measure measures nothing, not even the matmul ceiling: it re-renders the
tables with the figures of the run that measured the rows, so they come out as they were.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax

import efficient_attn as ea
from efficient_attn import measure, report
from efficient_attn.sweeps.cost import interface, point, slopes, table2, tokens
from efficient_attn.sweeps.cost.budgets import Budgets, claimed, is_done, point_budget
from efficient_attn.sweeps.cost.config import CostConfig
from efficient_attn.sweeps.cost.point import row_key
from efficient_attn.sweeps.cost.presets import PRESETS
from efficient_attn.sweeps.cost.progress import progress_bar
from efficient_attn.sweeps.cost.report import write_outputs

__all__ = ["MODES", "select_variants", "run", "rows_of", "previous_run_info", "rebased_rows"]

# Visiting order: a whole (pass, masking) mode, every length, before the next mode, so that a
# sweep stopped by its time budget has complete curves for the modes it reached.
MODES = (("fwd", False), ("fwd_bwd", False), ("fwd", True), ("fwd_bwd", True))

# The environment fields that describe one run's machine state rather than the software:
# kept from the measuring run when a later run only re-renders.
_RUN_INFO_PREFIXES = ("matmul_", "block_matmul_", "load_avg_")


def select_variants(cfg: CostConfig) -> list[str]:
    """The variants of ``cfg`` (every registered one when None); an unknown name raises KeyError."""
    names = ea.list_variants()
    if cfg.variants is None:
        return names
    for v in cfg.variants:
        if v not in names:
            ea.get_spec(v)  # raises KeyError with suggestions
    return list(dict.fromkeys(cfg.variants))


def points(cfg: CostConfig, variants: Sequence[str]):
    """(variant, pass, causal, N) in visiting order; a masking only where the variant has it."""
    for pass_, causal in MODES:
        if pass_ not in cfg.passes or causal not in cfg.causal_modes:
            continue
        for n in sorted(set(cfg.lengths)):
            for name in variants:
                caps = ea.get_spec(name).capabilities
                if not (caps.causal if causal else caps.bidirectional):
                    continue
                yield name, pass_, causal, n


def previous_run_info(out: str | Path) -> dict[str, Any]:
    """The matmul ceiling and load averages recorded in ``out/rows.json`` ({} when absent)."""
    try:
        env = json.loads((Path(out) / "rows.json").read_text()).get("environment") or {}
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in env.items() if k.startswith(_RUN_INFO_PREFIXES)}


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _ceiling_budget_s(cfg: CostConfig) -> float:
    return min(1.0, max(cfg.repeat_budget_s, 0.3))


def run(cfg: CostConfig, out: str | Path, *, force: bool = False, progress: bool = True,
        report_only: bool = False) -> report.RowStore:
    """Measure every point of ``cfg`` not already in ``out/rows.jsonl``; write the tables and plots.

    ``report_only``: measure nothing, only rebuild the tables from the stored rows (points
    still pending stay so). Tables are rebuilt from the store when the sweep ends, fails or
    is interrupted.

    ``force`` measures every selected point again. Run with a preset exactly as defined, it
    starts from an empty store (rows of points the preset no longer has go too); narrowed (a
    variant, pass or length subset, another shape or budget) it redoes only the selected points,
    each new row replacing its old one, and every other row is kept: ``--force --variants X``
    must not throw away the other variants' measurements.
    """
    if report_only and force:
        raise ValueError("cost: report_only=True re-renders the stored rows; it cannot be combined with force=True")
    out = Path(out)
    store = report.sweep_store(out / "rows.jsonl", cfg, PRESETS, force=force)
    variants = select_variants(cfg)
    todo = list(points(cfg, variants))
    budget = point_budget(cfg)
    left = sum(not is_done(store.get(row_key("cost", *p, cfg)), budget) for p in todo)
    left += interface.pending(cfg, variants, store)
    left += tokens.pending(cfg, variants, store)
    left += slopes.pending(cfg, variants, store)
    left += table2.pending(cfg, variants, store)
    if report_only or not (left or force):
        write_outputs(out, store.rows(), cfg, previous_run_info(out))
        return store
    info: dict[str, Any] = {"load_avg_start": _load_avg()}
    try:
        info.update(measure.matmul_rate(cfg.matmul_n, budget_s=_ceiling_budget_s(cfg)))
        # the ceiling is the best call: on a shared CPU the median is pulled down by other processes
        info["matmul_gflops"] = info["matmul_best_gflops"]
        info["matmul_best_gflops_start"] = info["matmul_best_gflops"]
        info.update(measure.block_matmul_rate(budget_s=_ceiling_budget_s(cfg)))
        _sweep(cfg, todo, store, budget, info["matmul_gflops"], force=force, progress=progress)
        if cfg.interface.enabled:
            interface.run_interface(cfg, variants, store, force=force, progress=progress)
        tokens.run_tokens(cfg, variants, store, info["matmul_gflops"], force=force, progress=progress)
        slopes.run_slopes(cfg, variants, store, force=force, progress=progress)
        if cfg.table2.enabled:
            table2.run_table2(cfg, variants, store, force=force, progress=progress)
        # measure the ceiling again at the end and keep the better: other processes may have left
        end = measure.matmul_rate(cfg.matmul_n, budget_s=_ceiling_budget_s(cfg))
        info["matmul_best_gflops_end"] = end["matmul_best_gflops"]
        info["matmul_gflops"] = max(info["matmul_gflops"], end["matmul_best_gflops"])
        end_block = measure.block_matmul_rate(budget_s=_ceiling_budget_s(cfg))
        info["block_matmul_best_gflops"] = max(info["block_matmul_best_gflops"], end_block["block_matmul_best_gflops"])
        if info["matmul_gflops"] > info["matmul_best_gflops_start"]:
            store.rewrite(rebased_rows(store, info["matmul_best_gflops_start"], info["matmul_gflops"]))
    finally:
        point.module_state.cache_clear()
        info["load_avg_end"] = _load_avg()
        write_outputs(out, store.rows(), cfg, info)
    return store


def rebased_rows(store: report.RowStore, start_gflops: float, ceiling_gflops: float) -> dict[str, dict]:
    """The rows measured against ``start_gflops`` (this run's ceiling when it began: rows carry the
    ceiling they were measured against) with their matmul fraction taken against
    ``ceiling_gflops``, the better of the run's two ceilings. A start measured while the CPU was
    busy would otherwise put fractions above 1 (a kernel faster than the ceiling it is compared
    with); ``matmul_gflops_at_start`` keeps what the row had."""
    out = {}
    for key, row in zip(store.keys(), store.rows()):
        if row.get("matmul_gflops") != start_gflops:
            continue
        row = {**row, "matmul_gflops": ceiling_gflops, "matmul_gflops_at_start": start_gflops}
        if row.get("gflops_per_s") is not None:
            row["matmul_fraction"] = row["gflops_per_s"] / ceiling_gflops
        out[key] = row
    return out


def _sweep(cfg: CostConfig, todo: list, store: report.RowStore, budget: dict, matmul_gflops: float, *,
           force: bool, progress: bool) -> None:
    budgets = Budgets(cfg.max_compile_s)
    bar = progress_bar(len(todo), progress, "cost")
    t_start = time.perf_counter()
    last = None
    try:
        for name, pass_, causal, n in todo:
            series = (name, pass_, causal)
            key = row_key("cost", name, pass_, causal, n, cfg)
            bar.set_postfix_str(f"{name} N={n} {pass_}{' causal' if causal else ''}")
            prev = store.get(key)
            if not force and is_done(prev, budget):
                budgets.remember(prev, series, "time_median_s")
                bar.update(1)
                continue
            if (pass_, causal) != last:  # drop the compiled programs of the previous mode
                jax.clear_caches()
                last = (pass_, causal)
            reason = budgets.skip_reason(series, n, t_start, cfg.sweep_budget_s)
            if reason is not None:
                row = point.base_row(name, pass_, causal, n, cfg)
                row.update(status="skipped", reason=reason)
            else:
                predicted, from_n = budgets.predict(series, n, claimed(ea.get_spec(name), "time"))
                row = point.measure_point(name, pass_, causal, n, cfg, matmul_gflops=matmul_gflops,
                                          predicted_s=predicted, from_n=from_n)
            store.add(key, row)
            budgets.remember(row, series, "time_median_s")
            bar.update(1)
    finally:
        bar.close()


def rows_of(cfg: CostConfig, store: report.RowStore) -> list[dict]:
    """The stored rows of ``cfg``'s points (kernel points, the interface part, then Table 2), in
    visiting order."""
    variants = select_variants(cfg)
    rows = [store.get(row_key("cost", *p, cfg)) for p in points(cfg, variants)]
    rows += [store.get(interface.row_key(p, cfg)) for p in interface.points(cfg, variants)]
    rows += [store.get(tokens.row_key(p, cfg)) for p in tokens.points(cfg, variants)]
    if cfg.table2.enabled:
        rows += [store.get(table2.row_key(name, n, cfg)) for name, n in table2.points(cfg, variants)]
    return [r for r in rows if r is not None]
