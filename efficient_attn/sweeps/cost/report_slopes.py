"""table_slopes.md: the interleaved slope check (``slopes.py``) beside the sweep's tail slopes."""

from __future__ import annotations

from typing import Any, Sequence

from efficient_attn import measure, report
from efficient_attn.sweeps.cost.analysis import current, ok, series
from efficient_attn.sweeps.cost.config import PASS_TITLES, CostConfig
from efficient_attn.sweeps.cost.report_tokens import claimed_exponent, rounded

__all__ = ["slopes_current", "slopes_markdown", "GOAL_SLOPE"]

GOAL_SLOPE = 1.15  # issue 17: the 1K-16K time slope of an O(N) or O(N log N) claim


def slopes_current(rows: Sequence[dict], cfg: CostConfig) -> list[dict]:
    """The check's rows at ``cfg``'s shape, dtype, lengths and rounds."""
    s = cfg.slopes
    return [r for r in current(rows, cfg, kind="slopes")
            if r.get("lengths") == sorted(set(s.lengths)) and r.get("rounds") == s.rounds]


def slopes_markdown(rows: Sequence[dict], cfg: CostConfig, env: dict[str, Any]) -> str:
    s = cfg.slopes
    lengths = sorted(set(s.lengths))
    mine = slopes_current(rows, cfg)
    kernel = series(current(rows, cfg))  # (pass, causal) -> variant -> N -> the sweep's row
    lines = [
        f"# Time slopes timed interleaved: preset `{cfg.preset}`", "",
        f"Every variant claiming O(N) or O(N log N) time (claimed exponent <= {s.max_claim:g} at N = {lengths[-1]}), "
        f"[B={cfg.batch}, N, H={cfg.heads}, D={cfg.head_dim}], {cfg.dtype}, on {env.get('device')} "
        f"({env.get('cpu')}, {env.get('cpu_cores')} cores). The programs of N = {', '.join(map(str, lengths))} are "
        f"compiled and warmed up, then timed in {s.rounds} rounds of one call per length, so that a window in "
        "which the machine runs slower touches every length alike; times are the medians per length, `slope` "
        "the log-log fit over them. `sweep slope` is the fit over the same lengths of table.md's points, which "
        "the sweep measured minutes apart (slopes.py says why the two differ). The issue's goal for these "
        f"variants is a slope <= {GOAL_SLOPE:g}.", "",
        "Time per call (ms).", "",
    ]
    control = {}
    for r in mine:
        control.setdefault((r["pass"], r["causal"]), {})[r["variant"]] = r
    over = []
    for pass_ in s.passes:
        for causal in cfg.causal_modes:
            by, same = control.get((pass_, causal), {}), kernel.get((pass_, causal), {})
            names = sorted(v for v, r in by.items() if r.get("status") == "ok")
            if not names:
                continue
            head = ["variant", "claims"] + [f"N={n}" for n in lengths] + ["slope", "sweep slope", "claimed"]
            body = []
            for v in names:
                r = by[v]
                sweep = [(n, ok(same.get(v, {}).get(n), "time_median_s")) for n in lengths]
                fit = measure.fit_loglog([n for n, _ in sweep], [t for _, t in sweep]) if all(t for _, t in sweep) else None
                body.append([v, r["claimed_time"]] + [report.to_ms(t) for t in r["medians_s"]]
                            + [rounded(r["slope"]), rounded(None if fit is None else fit.slope),
                               rounded(claimed_exponent(r["claimed_time"], lengths[-1]))])
                if r["slope"] is not None and r["slope"] > GOAL_SLOPE:
                    over.append(f"{v} ({PASS_TITLES[pass_].lower()}, {'causal' if causal else 'bidirectional'}, "
                                f"{r['slope']:.2f})")
            lines += [f"## {PASS_TITLES[pass_]}, {'causal' if causal else 'bidirectional'}", "",
                      report.markdown_table(head, body), ""]
    lines += ["## Notes", ""]
    lines.append(f"- Slopes over {GOAL_SLOPE:g}: " + (", ".join(over) + "." if over else "none."))
    not_run = [r for r in mine if r.get("status") != "ok"]
    for r in not_run:
        lines.append(f"- Not measured: {r['variant']} {r['pass']} {'causal' if r['causal'] else 'bidirectional'} "
                     f"({r['status']}): {r.get('reason')}")
    return "\n".join(lines) + "\n"
