"""The decode-cost experiment's outputs, rebuilt from its stored rows only.

``table.md``: per batch, the per-token step latency of every variant against the context
length with its fitted slope, its growth from the shortest to the longest context, its
speed-up over the KV-cache baseline (``analysis.baseline``: ``full``) at the longest context
and the context from which it is faster (crossover); the state / cache memory against the
context with its slope; and the check of the goal the experiment was set (the fixed-state
variants' step flat within 1.2x from the shortest to the longest context and at least 10x
faster than the baseline's there; the growth from the interleaved rows of ``growth`` where
they exist). ``rows.csv``, ``rows.json`` (with the environment) and ``decode.png`` beside it.
Nothing is measured here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from efficient_attn import report
from efficient_attn.sweeps.decode_cost.analysis import Summary, baseline, summarise
from efficient_attn.sweeps.decode_cost.config import MiB, DecodeCostConfig

__all__ = ["CSV_COLUMNS", "markdown", "write_outputs", "FLAT", "FASTER"]

FLAT = 1.2  # the goal: a fixed-state step grows at most this much over the contexts measured
FASTER = 10.0  # ... and is at least this much faster than the baseline's at the longest

CSV_COLUMNS = ("variant", "family", "batch", "context", "status", "reason", "step_median_s", "step_spread_s",
               "spread_kind", "repeats", "compile_s", "state_len", "state_bytes", "step_temp_bytes", "heads",
               "head_dim", "dtype", "steps_per_call")


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _ms_cell(row: dict | None):
    if row is None:
        return None
    if row.get("status") == "ok":
        return 1e3 * row["step_median_s"]
    return "skip" if row.get("status") == "skipped" else "error"


def _order(summaries: Sequence[Summary], base: str):
    return sorted(summaries, key=lambda s: (s.variant != base, s.state, s.variant))


def _latency_table(rows_by: dict, summaries: list[Summary], ns: list[int], base: str) -> str:
    headers = ["variant", "state", *[_k(n) for n in ns], "slope", "growth", f"x faster than {base}", "faster from"]
    body = []
    for s in summaries:
        cells = [_ms_cell(rows_by.get((s.variant, s.batch), {}).get(n)) for n in ns]
        growth = None if s.growth is None else f"{s.growth:.2f}x ({_k(s.growth_span[0])}-{_k(s.growth_span[1])})"
        speed = None if s.speedup is None else f"{s.speedup:.3g} at {_k(s.speedup_at)}"
        cross = "-"
        if s.crossover is not None and s.crossover.ns:
            c = s.crossover
            cross = (f"none <= {_k(c.ns[-1])}" if c.n is None else f"<= {_k(c.n)}" if c.from_start
                     else f"{_k(c.n)} (~{c.n_interp:.0f})")
        body.append([s.variant, s.state, *cells, None if s.slope is None else report.fixed(s.slope.slope), growth,
                     speed, cross if s.variant != base else "-"])
    return report.markdown_table(headers, body)


def _memory_table(rows_by: dict, summaries: list[Summary], ns: list[int]) -> str:
    headers = ["variant", "state", *[_k(n) for n in ns], "slope", "step scratch (MiB, longest measured)"]
    body = []
    for s in summaries:
        by_n = rows_by.get((s.variant, s.batch), {})
        mem = [None if n not in s.state_bytes else s.state_bytes[n] / MiB for n in ns]
        temps = [by_n[n].get("step_temp_bytes") for n in sorted(by_n) if by_n[n].get("status") == "ok"]
        temp = temps[-1] / MiB if temps and temps[-1] is not None else None
        body.append([s.variant, s.state, *mem, None if s.memory_slope is None else report.fixed(s.memory_slope.slope),
                     temp])
    return report.markdown_table(headers, body)


def _growth_table(growth: dict) -> str:
    body = [[r["variant"], r["shortest"], r["longest"], r["step_shortest_s"] * 1e3, r["step_longest_s"] * 1e3,
             r["growth"], r["rounds"]] if r.get("status") == "ok" else
            [r["variant"], r["shortest"], r["longest"], r.get("status"), r.get("reason"), None, r.get("rounds")]
            for r in growth.values()]
    return report.markdown_table(["variant", "shortest", "longest", "ms per token at shortest",
                                  "ms per token at longest", "growth", "rounds"], body)


def _goal(summaries: list[Summary], base: str, growth: dict) -> list[str]:
    """Per fixed-state variant: its growth (the interleaved row's where there is one, else the
    points' ratio) against FLAT, its speed-up over the baseline against FASTER."""
    lines = []
    for s in summaries:
        if s.state != "fixed" or s.growth is None:
            continue
        g = growth.get(s.variant)
        interleaved = g is not None and g.get("status") == "ok"
        value, (lo, hi) = (g["growth"], (g["shortest"], g["longest"])) if interleaved else (s.growth, s.growth_span)
        flat = value <= FLAT
        fast = s.speedup is not None and s.speedup >= FASTER
        lines.append(f"- {s.variant}: step growth {value:.2f}x over {_k(lo)}-{_k(hi)} "
                     f"{'(interleaved) ' if interleaved else ''}({'within' if flat else 'above'} {FLAT}x); "
                     + (f"{s.speedup:.3g}x faster than {base} at {_k(s.speedup_at)} "
                        f"({'at least' if fast else 'below'} {FASTER:g}x)" if s.speedup is not None
                        else f"no {base} point to compare with"))
    return lines


def markdown(rows: Sequence[dict], cfg: DecodeCostConfig, env: dict | None = None,
             growth_rows: Sequence[dict] = ()) -> str:
    base = baseline()
    rows = [r for r in rows if r is not None]
    summaries = summarise(rows, base)
    rows_by: dict = {}
    for r in rows:
        rows_by.setdefault((r["variant"], r["batch"]), {})[r["context"]] = r
    ns = sorted({r["context"] for r in rows})
    out = [
        "# Decode cost: per-token step latency and state memory against context length\n",
        f"Preset `{cfg.preset}`: {cfg.heads} heads of {cfg.head_dim}, {cfg.dtype}; the attention core's "
        f"`step` on a state holding the context (random contents, every slot real), {cfg.steps_per_call} "
        "steps per timed call (a `lax.scan`), median of the timed calls after a warm-up, divided by the steps. "
        "Memory: the decoding state's arrays (KV cache, ring buffer or recurrent state), exact from their "
        "shapes; scratch: the compiled program's temporaries.",
    ]
    if env:
        out.append(f"Measured at commit `{env.get('commit')}`, {env.get('backend')} ({env.get('cpu')}, "
                   f"{env.get('cpu_cores')} cores).")
    out.append("")
    for batch in sorted({r["batch"] for r in rows}):
        part = _order([s for s in summaries if s.batch == batch], base)
        out += [f"## Step latency (ms per token), batch {batch}\n",
                _latency_table(rows_by, part, ns, base),
                f"## State memory (MiB), batch {batch}\n",
                _memory_table(rows_by, part, ns)]
        growth = {r["variant"]: r for r in growth_rows if r["batch"] == batch}
        if growth:
            out += [f"Growth of the fixed-state step, batch {batch}: the one compiled step program on the state at "
                    "the shortest and at the longest context, timed in the same interleaved rounds (the order "
                    "rotated each round; medians), so that the machine's drift between points measured minutes "
                    "apart falls on both alike. The columns above are each point's own median.\n",
                    _growth_table(growth), ""]
        goal = _goal(part, base, growth)
        if goal:
            out += [f"Goal for the fixed-state variants at batch {batch} (flat within {FLAT}x, at least "
                    f"{FASTER:g}x faster than {base} at the longest context):\n", *goal, ""]
    skipped = [r for r in rows if r.get("status") != "ok"]
    if skipped:
        out += ["## Not measured\n",
                report.markdown_table(["variant", "batch", "context", "status", "reason"],
                                      [[r["variant"], r["batch"], r["context"], r["status"], r.get("reason")]
                                       for r in skipped])]
    return "\n".join(out) + "\n"


def write_outputs(out: Path, rows: Sequence[dict], cfg: DecodeCostConfig, growth_rows: Sequence[dict] = ()) -> None:
    """table.md, rows.csv, rows.json and decode.png in ``out``, from ``rows`` (the points) and
    ``growth_rows`` (the interleaved growth rows) only."""
    from efficient_attn.sweeps.decode_cost.plots import plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # where the rows were measured (rows stored before they kept it: the rows.json of their run)
    env = {**report.measured_environment(rows, stored=out / "rows.json"), "preset": cfg.preset}
    report.write_atomic(out / "table.md", markdown(rows, cfg, env, growth_rows))
    report.write_csv(out / "rows.csv", list(rows), CSV_COLUMNS)
    stored = {"environment": env, "config": dataclasses.asdict(cfg), "rows": list(rows)}
    if growth_rows:
        stored["growth_rows"] = list(growth_rows)
    report.write_json(out / "rows.json", stored)
    if any(r.get("status") == "ok" for r in rows):
        plot(rows, out / "decode.png", baseline())
