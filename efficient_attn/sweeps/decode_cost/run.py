"""The decode-cost sweep: every (context, batch, variant) point of a config into a RowStore.

Each finished point is appended to ``out/rows.jsonl`` as it completes, so a rerun resumes
(``force`` starts over); the tables are rebuilt from the store at the end, on an error and on
Ctrl-C. A point over a budget is stored as skipped with its reason (its state size is still
known), an exception as an error; neither stops the sweep. After the points, one interleaved
growth row per fixed-state (variant, batch) (``growth``); an errored one is retried on a rerun.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import jax

import efficient_attn as ea
from efficient_attn import report
from efficient_attn.sweeps.cost.progress import progress_bar
from efficient_attn.sweeps.decode_cost import growth, point
from efficient_attn.sweeps.decode_cost.config import DecodeCostConfig
from efficient_attn.sweeps.decode_cost.presets import PRESETS
from efficient_attn.sweeps.decode_cost.report import write_outputs

__all__ = ["select_variants", "points", "row_key", "is_done", "run", "rows_of", "growth_rows_of"]


def select_variants(cfg: DecodeCostConfig) -> list[str]:
    """The decode-capable variants of ``cfg`` (all registered ones when None). A named variant
    that cannot decode is refused with the capability's error."""
    if cfg.variants is None:
        return [n for n in ea.list_variants() if ea.get_spec(n).capabilities.decode]
    for name in cfg.variants:
        if not ea.get_spec(name).capabilities.decode:  # an unknown name raises KeyError here
            raise ea.CapabilityError(name, "decoding (the decode-cost experiment times its step)", "decode")
    return list(dict.fromkeys(cfg.variants))


def points(cfg: DecodeCostConfig, variants: Sequence[str]):
    """(variant, batch, context) in visiting order: context by context."""
    for context in sorted(set(cfg.contexts)):
        for batch in sorted(set(cfg.batches)):
            for name in variants:
                yield name, batch, context


def row_key(name: str, batch: int, context: int, cfg: DecodeCostConfig) -> str:
    return report.RowStore.make_key("decode", name, batch, context, cfg.heads, cfg.head_dim, cfg.dtype,
                                    cfg.steps_per_call)


def _budget(cfg: DecodeCostConfig) -> dict[str, Any]:
    return {"max_step_s": cfg.max_step_s, "memory_budget_bytes": cfg.memory_budget_bytes}


def is_done(row: dict | None, cfg: DecodeCostConfig) -> bool:
    """Final: ok, or skipped over a budget that has not changed since. Errors and deadline
    skips are tried again on a rerun."""
    if row is None:
        return False
    if row.get("status") == "ok":
        return True
    if row.get("status") == "skipped" and not str(row.get("reason", "")).startswith("sweep budget"):
        return all(row.get(k) == v for k, v in _budget(cfg).items())
    return False


def _skip_reason(row: dict, history: dict, cfg: DecodeCostConfig, t_start: float) -> str | None:
    if cfg.sweep_budget_s is not None and time.perf_counter() - t_start > cfg.sweep_budget_s:
        return f"sweep budget: {cfg.sweep_budget_s:g} s spent before this point (rerun to resume)"
    if 2 * row["state_bytes"] > cfg.memory_budget_bytes:
        return (f"memory budget: the state ({row['state_bytes'] / 2**20:.0f} MiB) held as input and output "
                f"exceeds memory_budget_bytes={cfg.memory_budget_bytes}")
    past = history.get((row["variant"], row["batch"]))
    if past:
        (n0, t0, b0) = past
        if t0 == float("inf"):
            return f"over budget already at context {n0} (see that row)"
        grows = row["state_bytes"] > b0  # a step reads its state: time grows as the state does
        predicted = t0 * (row["context"] / n0 if grows else 1.0)
        if predicted > cfg.max_step_s:
            return (f"time budget: predicted step {predicted * 1e3:.0f} ms (from context {n0}) > "
                    f"max_step_s={cfg.max_step_s:g} s")
    return None


def run(cfg: DecodeCostConfig, out: str | Path, *, force: bool = False, progress: bool = True,
        report_only: bool = False) -> report.RowStore:
    """Measure every point of ``cfg`` not already in ``out/rows.jsonl``; write tables and plot."""
    if report_only and force:
        raise ValueError("decode_cost: report_only=True re-renders the stored rows; it cannot be combined with force")
    out = Path(out)
    store = report.sweep_store(out / "rows.jsonl", cfg, PRESETS, force=force)
    variants = select_variants(cfg)
    todo = list(points(cfg, variants))
    flat = [u for u in growth.units(cfg, variants) if force or not _ok(store.get(growth.row_key(*u, cfg)))]
    if report_only or (not force and not flat and all(is_done(store.get(row_key(*p, cfg)), cfg) for p in todo)):
        write_outputs(out, rows_of(cfg, store), cfg, growth_rows_of(cfg, store))
        return store
    bar = progress_bar(len(todo) + len(flat), progress, "decode_cost")
    history: dict[tuple, tuple] = {}
    t_start = time.perf_counter()
    try:
        for name, batch, context in todo:
            key = row_key(name, batch, context, cfg)
            bar.set_postfix_str(f"{name} B={batch} context={context}")
            row = store.get(key)
            if force or not is_done(row, cfg):
                row = point.base_row(name, batch, context, cfg)
                reason = _skip_reason(row, history, cfg, t_start)
                if reason is None:
                    row = point.measure_point(name, batch, context, cfg)
                else:
                    row.update(status="skipped", reason=reason)
                store.add(key, row)
            if row.get("status") == "ok":
                history[(name, batch)] = (context, row["step_median_s"], row["state_bytes"])
            elif str(row.get("reason", "")).startswith(("time budget", "memory budget")):
                history[(name, batch)] = (context, float("inf"), row["state_bytes"])  # longer ones: over too
            bar.update(1)
        jax.clear_caches()
        for name, batch in flat:
            bar.set_postfix_str(f"{name} B={batch} growth (interleaved)")
            store.add(growth.row_key(name, batch, cfg), growth.measure_growth(name, batch, cfg))
            bar.update(1)
    finally:
        bar.close()
        point.clear()
        write_outputs(out, rows_of(cfg, store), cfg, growth_rows_of(cfg, store))
    return store


def _ok(row: dict | None) -> bool:
    return row is not None and row.get("status") == "ok"


def growth_rows_of(cfg: DecodeCostConfig, store: report.RowStore) -> list[dict]:
    """The stored interleaved growth rows of ``cfg``'s fixed-state variants (``growth``)."""
    rows = [store.get(growth.row_key(*u, cfg)) for u in growth.units(cfg, select_variants(cfg))]
    return [r for r in rows if r is not None]


def rows_of(cfg: DecodeCostConfig, store: report.RowStore) -> list[dict]:
    """The stored rows of ``cfg``'s points, in visiting order."""
    rows = [store.get(row_key(*p, cfg)) for p in points(cfg, select_variants(cfg))]
    return [r for r in rows if r is not None]
