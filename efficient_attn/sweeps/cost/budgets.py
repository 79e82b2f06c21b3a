"""When the cost sweep does not measure a point: over a time, memory or compile budget, past
the sweep's deadline, or already done in the store."""

from __future__ import annotations

import math
import time
from typing import Any

from efficient_attn import measure

__all__ = ["claimed", "predict", "is_done", "point_budget", "Budgets"]


def claimed(spec, which: str) -> measure.Complexity | None:
    """The variant's claimed growth (``which``: "time" or "memory"), or None when unreadable."""
    try:
        return measure.parse_big_o(getattr(spec.capabilities, which))
    except ValueError:
        return None


def predict(history: list[tuple[int, float]], n: int, claim: measure.Complexity | None) -> tuple[float, float] | None:
    """Predicted value at ``n`` from the longest measured lengths below it: (value, exponent used).

    None when nothing shorter was measured. The exponent is the local slope of the last two
    points, or the claimed one with a single point, clipped to [1, 3] (small lengths are
    overhead-dominated and understate growth).
    """
    below = sorted(p for p in history if p[0] < n)
    if not below:
        return None
    n1, y1 = below[-1]
    if len(below) >= 2 and below[-2][1] > 0 and y1 > 0:
        n0, y0 = below[-2]
        e = math.log(y1 / y0) / math.log(n1 / n0)
    else:
        e = claim.slope_at(n) if claim else 2.0
    e = min(max(e, 1.0), 3.0)
    return y1 * (n / n1) ** e, e


def point_budget(cfg) -> dict[str, Any]:
    """The budgets a kernel-shaped point is measured under (``CostConfig``'s), as stored in its row."""
    return {"max_call_s": cfg.max_call_s, "max_compile_s": cfg.max_compile_s,
            "memory_budget_bytes": cfg.memory_budget_bytes}


def is_done(row: dict | None, budget: dict[str, Any]) -> bool:
    """A stored row is final when ok, or skipped under the same budgets as now.

    Errors and points skipped for a sweep's deadline are tried again on a rerun; so are
    budget skips when a budget has changed since.
    """
    if row is None:
        return False
    if row.get("status") == "ok":
        return True
    if row.get("status") == "skipped" and not str(row.get("reason", "")).startswith("sweep budget"):
        return all(row.get(k) == v for k, v in budget.items())
    return False


class Budgets:
    """Per series: the measured (N, time) points, and the shortest N that went over a budget
    (longer lengths of that series are then skipped without trying)."""

    def __init__(self, max_compile_s: float):
        self.max_compile_s = max_compile_s
        self.history: dict[tuple, list[tuple[int, float]]] = {}
        self.over: dict[tuple, tuple[int, str]] = {}

    def _over(self, series: tuple, n: int, reason: str) -> None:
        if series not in self.over or n < self.over[series][0]:
            self.over[series] = (n, reason)

    def remember(self, row: dict, series: tuple, time_field: str) -> None:
        n = row["n"]
        if row.get("status") == "ok" and row.get(time_field):
            self.history.setdefault(series, []).append((n, row[time_field]))
            if (row.get("compile_s") or 0) > self.max_compile_s:
                self._over(series, n, f"compile budget: compiling N={n} took {row['compile_s']:.0f} s > "
                                      f"max_compile_s={self.max_compile_s:g} s")
        elif row.get("status") == "skipped" and str(row.get("reason", "")).startswith(("time budget", "memory budget")):
            self._over(series, n, f"over budget already at N={n} (see that row)")

    def predict(self, series: tuple, n: int, claim: measure.Complexity | None):
        """(prediction, exponent) or None, and the length it was extrapolated from."""
        hist = self.history.get(series, [])
        below = [m for m, _ in hist if m < n]
        return predict(hist, n, claim), (max(below) if below else None)

    def skip_reason(self, series: tuple, n: int, t_start: float, deadline: float | None) -> str | None:
        if deadline is not None and time.perf_counter() - t_start > deadline:
            return f"sweep budget: {deadline:g} s spent before this point (rerun to resume)"
        if series in self.over and n > self.over[series][0]:
            return self.over[series][1]
        return None
