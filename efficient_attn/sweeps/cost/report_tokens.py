"""table_tokens.md: the fixed-token control (``tokens.py``) beside the length slopes it explains."""

from __future__ import annotations

import math
from typing import Any, Sequence

from efficient_attn import measure, report
from efficient_attn.sweeps.cost.analysis import current, ok, series
from efficient_attn.sweeps.cost.config import PASS_TITLES, CostConfig

__all__ = ["tokens_current", "tokens_markdown", "fixed_token_slope", "claimed_exponent", "rounded"]


def tokens_current(rows: Sequence[dict], cfg: CostConfig) -> list[dict]:
    """The control's rows at ``cfg``'s heads, head_dim, dtype and number of tokens."""
    t = cfg.tokens
    return [r for r in rows if r.get("kind") == "tokens" and r.get("batch")
            and r["batch"] * r["n"] == t.tokens * cfg.batch
            and (r.get("heads"), r.get("head_dim"), r.get("dtype")) == (cfg.heads, cfg.head_dim, cfg.dtype)]


def fixed_token_slope(points: Sequence[tuple[int, float]]) -> float | None:
    """Least-squares slope of log time against log N at fixed B x N (None under two points)."""
    fit = measure.fit_loglog([n for n, _ in points], [t for _, t in points]) if len(points) >= 2 else None
    return None if fit is None else fit.slope


def tokens_markdown(rows: Sequence[dict], cfg: CostConfig, env: dict[str, Any]) -> str:
    t = cfg.tokens
    mine = tokens_current(rows, cfg)
    kernel = series(current(rows, cfg))  # (pass, causal) -> variant -> N -> the sweep's row
    lengths = sorted(set(t.lengths))
    lines = [
        f"# Cost at a fixed number of tokens: preset `{cfg.preset}`", "",
        f"Every subquadratic variant at B x N = {cfg.batch * t.tokens} tokens (B = {cfg.batch * t.tokens} / N), "
        f"[B, N, H={cfg.heads}, D={cfg.head_dim}], {cfg.dtype}, on {env.get('device')} ({env.get('cpu')}, "
        f"{env.get('cpu_cores')} cores); the N = {t.tokens} column is the kernel sweep's own point (table.md). "
        "Every point holds buffers of the same size, so the slope of time against N here is what the sequence "
        "length alone costs: claim - 1, i.e. 0 for O(N), about 0.1 for O(N log N), 0.5 for O(N sqrt N). "
        f"`length slope` is the batch-{cfg.batch} fit over N = {lengths[0]}-{t.tokens} of table.md; where it is "
        "above its claim and the fixed-token slope is near claim - 1, the excess comes from the total size of "
        "the work on this machine (buffers that fit its caches or not), not from the algorithm's growth in N. "
        "The last column may come from another invocation of the sweep than the others (a resumed run "
        "measures only what is missing).", "",
        "Time per call (ms); same timing protocol as table.md.", "",
    ]
    control = series(mine)
    for pass_ in t.passes:
        for causal in cfg.causal_modes:
            by, same = control.get((pass_, causal), {}), kernel.get((pass_, causal), {})
            names = sorted(by)
            if not names:
                continue
            head = (["variant", "claims"] + [f"B={cfg.batch * t.tokens // n} N={n}" for n in lengths]
                    + [f"B={cfg.batch} N={t.tokens}"]
                    + ["fixed-token slope", "length slope", "claimed - 1"])
            body = []
            for v in names:
                last = same.get(v, {}).get(t.tokens)
                tok = ([(n, ok(by[v].get(n), "time_median_s")) for n in lengths]
                       + [(t.tokens, ok(last, "time_median_s"))])
                length_pts = [(n, ok(same.get(v, {}).get(n), "time_median_s")) for n in lengths + [t.tokens]]
                fixed = fixed_token_slope([(n, x) for n, x in tok if x])
                length = fixed_token_slope([(n, x) for n, x in length_pts if x])
                claim = (last or next(iter(by[v].values()))).get("claimed_time")
                c_exp = claimed_exponent(claim, t.tokens)
                body.append([v, claim] + [None if x is None else report.to_ms(x) for _, x in tok]
                            + [rounded(fixed), rounded(length), rounded(None if c_exp is None else c_exp - 1)])
            lines += [f"## {PASS_TITLES[pass_]}, {'causal' if causal else 'bidirectional'}", "",
                      report.markdown_table(head, body), ""]
    skipped = [r for r in mine if r.get("status") != "ok"]
    if skipped:
        lines += ["## Points not measured", "",
                  report.markdown_table(["variant", "pass", "causal", "N", "status", "reason"],
                                        [[r["variant"], r["pass"], r["causal"], r["n"], r["status"], r.get("reason")]
                                         for r in skipped]), ""]
    return "\n".join(lines)


def claimed_exponent(claim: str | None, n: int) -> float | None:
    """The local exponent at ``n`` of a claimed complexity string (None when absent or unreadable)."""
    try:
        return measure.parse_big_o(claim).slope_at(n) if claim else None
    except ValueError:
        return None


def rounded(x: float | None) -> float | None:
    """Two decimals for a table cell (None for a missing or non-finite value)."""
    return None if x is None or not math.isfinite(x) else round(x, 2)
