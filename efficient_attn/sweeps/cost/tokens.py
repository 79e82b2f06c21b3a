"""The fixed-token control of the cost experiment: is a slope above the claim about N?

A time slope fitted against N, at batch 1, mixes two things: how the algorithm's work grows
with the sequence length, and how the machine's speed changes with the size of the working
set (caches, memory bandwidth). The control separates them. It measures each subquadratic
variant at a fixed number of tokens B x N = ``TokensConfig.tokens`` (times the sweep's batch):
(B = batch x tokens / N, N) for each of its lengths, with the kernel sweep's own (batch, N =
tokens) point as the last one.
The buffers have the same size at every point, so the slope of time against N at fixed
tokens is what the sequence length alone costs:

    t(B, N) ~ B N^p  =>  at B N fixed, t ~ N^(p - 1):  0 for O(N), ~0.1 for O(N log N), 1 for O(N^2).

A length slope above its claim whose fixed-token slope is near ``claim - 1`` comes from the
size of the work on this machine (the step from cache-resident to memory-bound buffers),
not from a term of the algorithm that grows faster than it says.

Rows of kind "tokens" in the cost RowStore, keyed like kernel points (their batch differs);
measured and timed by ``point.measure_point``; a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax

import efficient_attn as ea
from efficient_attn import report
from efficient_attn.sweeps.cost import point
from efficient_attn.sweeps.cost.analysis import ok
from efficient_attn.sweeps.cost.budgets import Budgets, claimed, is_done, point_budget
from efficient_attn.sweeps.cost.config import CostConfig
from efficient_attn.sweeps.cost.progress import progress_bar

__all__ = ["points", "row_key", "pending", "run_tokens", "kernel_key"]


def _subquadratic(name: str, n: int) -> bool:
    """Claims a time that grows slower than N^2 (at N = n: "N b + N^2 / b" counts as N^2)."""
    claim = claimed(ea.get_spec(name), "time")
    return claim is not None and claim.slope_at(n) < 1.9


def points(cfg: CostConfig, variants: Sequence[str]) -> list[tuple[str, str, bool, int, int]]:
    """(variant, pass, causal, N, batch) of the control, mode by mode, shortest N first; the
    (batch 1, N = tokens) points are the kernel sweep's and are not listed here."""
    t = cfg.tokens
    if not t.enabled or t.tokens not in cfg.lengths:  # the last column is the sweep's own point
        return []
    out = []
    for pass_ in t.passes:
        for causal in cfg.causal_modes:
            for n in sorted(t.lengths):
                for name in variants:
                    caps = ea.get_spec(name).capabilities
                    if not _subquadratic(name, t.tokens) or not (caps.causal if causal else caps.bidirectional):
                        continue
                    out.append((name, pass_, causal, n, cfg.batch * (t.tokens // n)))  # the work of (batch, tokens)
    return out


def _batched(cfg: CostConfig, batch: int) -> CostConfig:
    return dataclasses.replace(cfg, batch=batch)


def row_key(p: tuple[str, str, bool, int, int], cfg: CostConfig) -> str:
    name, pass_, causal, n, batch = p
    return point.row_key("tokens", name, pass_, causal, n, _batched(cfg, batch))


def kernel_key(name: str, pass_: str, causal: bool, cfg: CostConfig) -> str:
    """The kernel sweep's (batch, N = tokens) point, the control's last column."""
    return point.row_key("cost", name, pass_, causal, cfg.tokens.tokens, cfg)


def pending(cfg: CostConfig, variants: Sequence[str], store: report.RowStore) -> int:
    budget = point_budget(cfg)
    return sum(not is_done(store.get(row_key(p, cfg)), budget) for p in points(cfg, variants))


def run_tokens(cfg: CostConfig, variants: Sequence[str], store: report.RowStore, matmul_gflops: float | None, *,
               force: bool = False, progress: bool = True) -> None:
    """Measure the control's points not already in ``store`` (the kernel points it reads are the
    sweep's). A point is skipped where its batch-1 twin was skipped, or predicted (from that
    twin's time: the same work) over ``max_call_s``."""
    todo = points(cfg, variants)
    budget = point_budget(cfg)
    budgets = Budgets(cfg.max_compile_s)
    bar = progress_bar(len(todo), progress, "tokens")
    t_start = time.perf_counter()
    last = None
    try:
        for p in todo:
            name, pass_, causal, n, batch = p
            key = row_key(p, cfg)
            bar.set_postfix_str(f"{name} B={batch} N={n} {pass_}{' causal' if causal else ''}")
            prev = store.get(key)
            if not force and is_done(prev, budget):
                bar.update(1)
                continue
            if (pass_, causal) != last:
                jax.clear_caches()
                last = (pass_, causal)
            c = _batched(cfg, batch)
            reason = budgets.skip_reason((name, pass_, causal), n, t_start, cfg.tokens.budget_s)
            same_work = store.get(kernel_key(name, pass_, causal, cfg))  # the same tokens at batch 1
            if reason is None and same_work and same_work.get("status") == "skipped":
                reason = f"the kernel sweep's B=1 N={cfg.tokens.tokens} point was skipped: {same_work.get('reason')}"
            if reason is not None:
                row = point.base_row(name, pass_, causal, n, c)
                row.update(status="skipped", reason=reason)
            else:
                # the same work as the batch-1 point: its time predicts this one's (growth 0 at fixed tokens)
                known = ok(same_work, "time_median_s")
                row = point.measure_point(name, pass_, causal, n, c, matmul_gflops=matmul_gflops,
                                          predicted_s=None if known is None else (known, 0.0),
                                          from_n=cfg.tokens.tokens)
            row["kind"] = "tokens"
            store.add(key, row)
            bar.update(1)
    finally:
        bar.close()
        point.module_state.cache_clear()
