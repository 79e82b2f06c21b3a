"""The cost experiment's outputs, rebuilt from its stored rows only: tables, CSV, JSON, plots.

``cost_markdown`` writes table.md: per (pass, masking), time and memory against N with the
fitted log-log slopes beside the claimed ones, speed-up and memory ratios against every
baseline (``analysis.baselines``: ``full``, ``blockwise``), the crossover lengths, the
fraction of the measured matmul rate, and notes that explain each slope that disagrees with
its claim. ``write_outputs`` writes it with the LRA Table 2 analog (``report_table2``) and the
interface part's table_interface.md (``report_interface``), with rows.csv, rows.json and the plots; a table can be
rebuilt from rows.jsonl at any time, byte for byte.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from efficient_attn import measure, report
from efficient_attn.sweeps.cost.analysis import analyse, baselines, current, ok, order_key, series
from efficient_attn.sweeps.cost.config import INTERFACE_KINDS as KINDS
from efficient_attn.sweeps.cost.config import PASS_TITLES, PASSES, MiB
from efficient_attn.sweeps.cost.plots import plot
from efficient_attn.sweeps.cost.report_interface import interface_current, interface_markdown, interface_summary
from efficient_attn.sweeps.cost.report_slopes import slopes_current, slopes_markdown
from efficient_attn.sweeps.cost.report_tokens import tokens_current, tokens_markdown
from efficient_attn.sweeps.cost.report_table2 import table2_current, table2_markdown, table2_rows

if TYPE_CHECKING:
    from efficient_attn.sweeps.cost.config import CostConfig

__all__ = ["CSV_COLUMNS", "cost_markdown", "table2_rows", "table2_markdown", "interface_summary",
           "interface_markdown", "write_outputs"]


def _cell(r: dict | None, field: str, scale) -> Any:
    if r is None:
        return None
    if r.get("status") == "ok":
        return scale(r.get(field))
    if r.get("status") == "skipped":
        if field == "memory_bytes" and r.get("memory_bytes"):
            return f"({scale(r['memory_bytes']):.0f}, not run)"
        return "skip"
    return "error"


def _ratio_cell(r: dict | None, by_base: dict[str, dict[int, dict]], n: int, field: str, invert: bool,
                bases: Sequence[str]) -> str:
    parts = []
    for base in bases:
        b = by_base.get(base, {}).get(n)
        v, bv = ok(r, field), ok(b, field)
        if v is None or bv is None:
            parts.append("-")
        else:
            parts.append(f"{(bv / v if invert else v / bv):.2g}")
    return " / ".join(parts)


def _fmt_cross(c: measure.Crossover | None) -> str:
    if c is None or not c.ns:
        return "-"
    if c.n is None:
        return f"none <= {c.ns[-1]}"
    if c.from_start:
        return f"<= {c.n}"
    return f"{c.n} (~{c.n_interp:.0f})"


def _fmt_slope(fit: measure.Fit | None) -> str:
    return "-" if fit is None else report.fixed(fit.slope)


def _scaling_table(names: Sequence[str], info: dict, by_variant: dict, ns: list[int], which: str, field: str,
                   fmt) -> str:
    """One variant per row: its claim, ``field`` at each N (formatted by ``fmt``), the fitted
    slope over all lengths and over the 3 longest, and the claimed slope (``which``: "time" or
    "memory", the prefix of ``analyse``'s keys)."""
    head = ["variant", "claims"] + [f"N={n}" for n in ns] + ["slope", "tail slope", "claimed"]
    body = []
    for v in names:
        i = info[v]
        body.append([v, i[f"{which}_claim_text"]] + [_cell(by_variant[v].get(n), field, fmt) for n in ns]
                    + [_fmt_slope(i[f"{which}_fit"]), _fmt_slope(i[f"{which}_tail_fit"]), i[f"{which}_claimed"]])
    return report.markdown_table(head, body)


NOT_RECORDED = "not recorded (measured before rows kept it: glibc's defaults)"


def allocator_phrase(rows: Iterable[dict]) -> str:
    """Which allocator settings the timed rows ran under (``allocator.describe()``), with counts when mixed."""
    seen = Counter(r.get("allocator") or NOT_RECORDED for r in rows if r.get("time_median_s") is not None)
    if not seen:
        return "no timed rows"
    if len(seen) == 1:
        return next(iter(seen))
    return "; ".join(f"{name} for {n} timed rows" for name, n in seen.most_common())


def _header(cfg: CostConfig, rate: dict[str, Any] | None, env: dict, rows: Iterable[dict]) -> list[str]:
    return [
        f"# Cost scaling: preset `{cfg.preset}`", "",
        f"q, k, v of shape [B={cfg.batch}, N, H={cfg.heads}, D={cfg.head_dim}], {cfg.dtype}, on "
        f"{env.get('device')} ({env.get('cpu')}, {env.get('cpu_cores')} cores), jax {env.get('jax')}. "
        f"Allocator: {env.get('allocator') or allocator_phrase(rows)}. "
        + (f"Matmul ceiling measured in this run: {rate['matmul_gflops']:.0f} GFLOP/s (best call of an f32 "
           f"{rate['matmul_n']}^3 product, measured at the start and at the end of the run, the better kept; the "
           "matmul fractions of the rows this run measured are against it, those of earlier runs against "
           "their own: `matmul_gflops` in rows.csv). "
           if rate and rate.get("matmul_gflops") else "")
        + (f"Batched {rate['block_matmul_shape'][1]}^3 products ({rate['block_matmul_shape'][0]} in one call, "
           "the shape of the inner products of the chunked linear / delta-rule and block-sparse engines) "
           f"reached {rate['block_matmul_best_gflops']:.0f} GFLOP/s, "
           f"{rate['block_matmul_best_gflops'] / rate['matmul_gflops']:.2f} of that ceiling: about the most "
           "such an engine can reach with XLA's CPU dot. "
           if rate and rate.get("block_matmul_best_gflops") and rate.get("matmul_gflops") else "")
        + (f"Load average (1, 5, 15 min) at the start of this run: {rate['load_avg_start']}, at the end: "
           f"{rate.get('load_avg_end')} (a load above the core count means other processes shared the CPU "
           "and times are inflated). " if rate and rate.get("load_avg_start") else ""),
        "",
        "Time: median of timed calls after a warm-up, each inside `jax.block_until_ready`; compile "
        "time is apart (`compile_s` in rows.csv). Memory: `compiled.memory_analysis()` argument + "
        "output + temporary bytes of one call (`temp_bytes` alone in rows.csv). `fwd_bwd` is the "
        "gradient of <out, g> with respect to q, k, v and the variant's parameters. `skip`: over a "
        "budget (reason in rows.csv); `(M, not run)`: compiled memory M MiB over the memory budget.",
        "",
    ]


# "jaxpr_lower_bound" is what older rows call "jaxpr_inexact" (it was never a bound: a loop that
# runs no trip is counted once too).
_INEXACT_FLOPS = ("jaxpr_inexact", "jaxpr_lower_bound", "xla_loop_body_once")


def _fraction_cell(row: dict | None) -> Any:
    """The matmul fraction; in parentheses where the FLOP count is not exact (see the notes)."""
    if not row or row.get("matmul_fraction") is None:
        return None
    if row.get("flops_source") in _INEXACT_FLOPS:
        return f"({row['matmul_fraction']:.3g})"
    return row["matmul_fraction"]


def _last_timed(points: dict, ns: Sequence[int]) -> dict | None:
    """The row of the longest length that has a time (its FLOP source and matmul fraction)."""
    return next((points[n] for n in reversed(ns) if ok(points.get(n), "time_median_s")), None)


def _group_section(title: str, by_variant: dict, info: dict, bases: Sequence[str]) -> list[str]:
    """The tables of one (pass, masking): time, memory, then ratios and crossovers (with a
    baseline) or the matmul fractions alone (without one)."""
    ns = sorted({n for v in by_variant.values() for n in v})
    names = sorted(by_variant, key=order_key(bases))
    lines = [f"## {title}", "", "Time per call (ms); slope = least-squares log-log fit over the measured "
             "lengths (tail: the 3 longest), claimed = the capabilities' exponent.", ""]
    lines += [_scaling_table(names, info, by_variant, ns, "time", "time_median_s", report.to_ms)]
    lines += ["Memory per call (MiB, compiled arguments + outputs + temporaries).", ""]
    lines += [_scaling_table(names, info, by_variant, ns, "memory", "memory_bytes", report.to_mib)]
    if not bases:  # a run of some variants only: no ratio or crossover has a baseline to be taken against
        lines += ["No speed-ups or crossovers: these rows hold no baseline (exact attention) to take them "
                  "against; a run whose --variants include `full` gives them.", "", "Matmul fraction: FLOPs / time at "
                  "the longest measured N, over this run's matmul rate.", ""]
        body = []
        for v in names:
            last = _last_timed(by_variant[v], ns)
            body.append([v, last.get("flops_source") if last else None, _fraction_cell(last)])
        return lines + [report.markdown_table(["variant", "FLOPs source", "matmul fraction"], body)]
    lines += ["Speed-up (baseline time / variant time) and memory ratio (variant memory / baseline "
              f"memory), each as `{' / '.join(f'vs {b}' for b in bases)}`.", ""]
    head = ["variant"] + [f"speed-up N={n}" for n in ns] + [f"memory N={n}" for n in ns]
    body = []
    for v in names:
        body.append([v] + [_ratio_cell(by_variant[v].get(n), by_variant, n, "time_median_s", True, bases) for n in ns]
                    + [_ratio_cell(by_variant[v].get(n), by_variant, n, "memory_bytes", False, bases) for n in ns])
    lines += [report.markdown_table(head, body)]
    lines += ["Crossover N: the smallest measured N from which the variant is better than the baseline "
              "at every longer measured N (`~`: interpolated in log-log between the last losing and the "
              "first winning length; `<= N`: better from the first length; `none <= N`: not better at "
              "the longest length both measured). `both` = faster and less memory. Matmul fraction: "
              "FLOPs / time at the longest measured N, over this run's matmul rate.", ""]
    head = ["variant"] + [f"{what} vs {b}" for b in bases for what in ("time", "memory", "both")]
    head += ["FLOPs source", "matmul fraction"]
    body = []
    for v in names:
        i = info[v]
        last = _last_timed(by_variant[v], ns)
        body.append([v] + [_fmt_cross(i.get(f"cross_{what}_{b}")) for b in bases for what in ("time", "memory", "both")]
                    + [last.get("flops_source") if last else None, _fraction_cell(last)])
    lines += [report.markdown_table(head, body)]
    return lines


def measured_baselines(rows: Sequence[dict]) -> tuple[str, ...]:
    """The registered baselines that have rows: an exact plugin outside the sweep gets no
    empty ratio columns."""
    present = {r.get("variant") for r in rows}
    return tuple(b for b in baselines() if b in present)


def cost_markdown(rows: Sequence[dict], cfg: CostConfig, rate: dict[str, float] | None, env: dict) -> str:
    """table.md: every (pass, masking) measured at ``cfg``'s shape, then the notes."""
    rows = current(rows, cfg)
    groups = series(rows)
    bases = measured_baselines(rows)
    analysis = analyse(rows, bases)
    lines = _header(cfg, rate, env, rows)
    notes: list[str] = []
    for (pass_, causal) in sorted(groups, key=lambda g: (PASSES.index(g[0]) if g[0] in PASSES else 9, g[1])):
        by_variant = groups[(pass_, causal)]
        info = analysis[(pass_, causal)]
        title = f"{PASS_TITLES.get(pass_, pass_)}, {'causal' if causal else 'bidirectional'}"
        group_rows = [r for v in by_variant.values() for r in v.values()]
        if not any(r.get("status") == "ok" for r in group_rows):
            reasons = sorted({_reason_kind(r) for r in group_rows})
            lines += [f"## {title}", "", f"Not measured: all {len(group_rows)} points skipped or failed "
                      f"({'; '.join(reasons)}); rerun to resume.", ""]
            continue
        lines += _group_section(title, by_variant, info, bases)
        ns = sorted({n for v in by_variant.values() for n in v})
        notes += _notes(title, by_variant, info, ns, bases)
    notes = _run_notes(rows, rate, env) + notes
    deadline = [r for r in rows if str(r.get("reason", "")).startswith("sweep budget")]
    if deadline:
        notes.append(f"{len(deadline)} of {len(rows)} points were not reached within the sweep's time budget "
                     "(`sweep_budget_s`); the same command resumes them.")
    if rate and rate.get("matmul_gflops") and any(
            (r.get("gflops_per_s") or 0) > rate["matmul_gflops"] for r in rows
            if r.get("flops_source") not in _INEXACT_FLOPS):
        notes.append("Some matmul fractions exceed 1: the matmul ceiling was measured while other processes "
                     "shared the CPU (see the load average), so it understates this machine's rate.")
    lines += ["## Notes", ""]
    lines += [f"- {n}" for n in notes] if notes else ["- Every fitted slope is within 0.3 of its claim."]
    lines.append("")
    return "\n".join(lines)


def _run_notes(rows: Sequence[dict], rate: dict | None, env: dict) -> list[str]:
    """The note that leads the list when other processes shared the CPU."""
    load = (rate or {}).get("load_avg_start") or []
    cores = env.get("cpu_cores") or 0
    if load and cores and max(load[0], ((rate or {}).get("load_avg_end") or [0])[0]) > cores:
        return [f"Other processes shared the CPU during this run (load average {load[0]} at the start, "
                f"{cores} cores): times are inflated and noisy (few repeats per point), so slopes and "
                "crossovers are rough; memory and FLOPs are unaffected. Rerun on an idle machine with "
                "`--force` for clean timings."]
    return []


def _reason_kind(r: dict) -> str:
    """The reason of a row that did not run, without its numbers ("sweep budget", "time budget"...)."""
    if r.get("status") == "error":
        return "error"
    return str(r.get("reason", "")).split(":", 1)[0] or str(r.get("status"))


def _notes(title: str, by_variant: dict, info: dict, ns: list[int], bases: Sequence[str]) -> list[str]:
    out = []
    past_base: dict[tuple[str, tuple], list[str]] = {}  # (baseline, lengths) -> variants measured there
    for v in sorted(info):
        i = info[v]
        for which in ("time", "memory"):
            fit, tail, claimed = i[f"{which}_fit"], i[f"{which}_tail_fit"], i[f"{which}_claimed"]
            if fit is None or claimed is None:
                continue
            slope = tail.slope if tail is not None else fit.slope
            d = slope - claimed
            if abs(d) <= 0.3:
                continue
            if d < 0:
                why = ("below the claim: at these lengths costs that do not grow like the claimed term "
                       "(dispatch, the O(N d) projections and reshapes, the inputs and outputs themselves in "
                       "the memory count) still dominate, so the asymptotic exponent is not reached yet"
                       if which == "time" or claimed > 1 else
                       "below the claim: buffers of fixed size (block scratch space, parameters, random "
                       "features) are still a large part of the total")
            else:
                why = ("above the claim: the implementation does more than its claimed asymptotics at "
                       "these lengths (a pass that grows faster, e.g. a sort, a padded or a dense step), "
                       "or the working set has left the CPU caches")
            out.append(f"{title}, `{v}` {which}: slope {slope:.2f} over the longest lengths "
                       f"(all lengths: {fit.slope:.2f}) against the claimed {claimed:.2f} "
                       f"({i[f'{which}_claim_text']}); {why}.")
        for base in bases:
            beyond = i.get(f"beyond_{base}")
            if beyond:
                past_base.setdefault((base, tuple(beyond)), []).append(v)
        loops = [n for n, r in sorted(by_variant[v].items()) if r.get("flops_source") in _INEXACT_FLOPS]
        if loops:
            out.append(f"{title}, `{v}`: FLOPs are not exact (a loop with a data-dependent trip count was counted "
                       "once, or a branch's costliest arm stood for all): neither an upper nor a lower bound, so "
                       "its matmul fraction is in parentheses and not comparable.")
        bad = [(n, r["status"], r.get("reason", "")) for n, r in sorted(by_variant[v].items())
               if r.get("status") == "error"]
        for n, _, reason in bad[:2]:
            out.append(f"{title}, `{v}` failed at N={n}: {reason[:200]}")
    for (base, beyond), names in sorted(past_base.items()):
        out.append(f"{title}: {', '.join(f'`{v}`' for v in names)} ran at N={', '.join(map(str, beyond))} where "
                   f"`{base}` was over budget; their crossovers use only lengths both measured.")
    return out


# ----------------------------------------------------------------------------- outputs

CSV_COLUMNS = [
    "kind", "variant", "n", "pass", "causal", "status", "reason", "time_median_s", "time_spread", "time_spread_kind",
    "time_min_s", "time_max_s", "repeats", "compile_s", "memory_bytes", "temp_bytes", "argument_bytes",
    "output_bytes", "xla_peak_bytes", "device_peak_bytes", "flops", "flops_source", "flops_xla", "flops_jaxpr",
    "gflops_per_s", "matmul_gflops", "matmul_fraction", "steps_per_s", "speedup_vs_full", "memory_vs_full",
    "claimed_time", "claimed_memory", "family", "exact", "batch", "heads", "head_dim", "dtype",
    "num_layers", "emb_dim", "mlp_dim", "num_kv_heads", "layout", "seq_len", "segment_lengths", "segment_range",
    "seed", "max_call_s", "max_compile_s", "memory_budget_bytes", "allocator",
]


def write_outputs(out: str | Path, rows: Sequence[dict], cfg: CostConfig, info: dict[str, Any] | None) -> None:
    """rows.csv, rows.json, table.md, time.png, memory.png (table2.md, table_interface.md,
    table_tokens.md, table_slopes.md) from the stored rows (the run has already rebased its
    rows' matmul fractions on its better ceiling: ``run.rebased_rows``).

    ``info``: the measuring run's matmul rate and load averages, added to the environment stamp.
    """
    out = Path(out)
    rows = [dict(r, kind=r.get("kind", "cost")) for r in rows]
    enriched = {id(r): e for r, e in zip(table2_current(rows, cfg), table2_rows(rows, cfg))}
    rows = [enriched.get(id(r), r) for r in rows]
    env = report.environment(cfg.preset, **(info or {}))
    env["allocator"] = allocator_phrase(current(rows, cfg))  # what the rows ran under, not this process
    report.write_csv(out / "rows.csv", rows, CSV_COLUMNS)
    report.write_json(out / "rows.json", {"environment": env, "config": dataclasses.asdict(cfg), "rows": rows})
    report.write_atomic(out / "table.md", cost_markdown(rows, cfg, info, env))
    bases = measured_baselines(rows)
    plot(rows, cfg, "time_median_s", out / "time.png", "time per call (s)", 1.0, bases)
    plot(rows, cfg, "memory_bytes", out / "memory.png", "compiled memory (MiB)", MiB, bases)
    if table2_current(rows, cfg):
        report.write_atomic(out / "table2.md", table2_markdown(rows, cfg, env))
    if any(interface_current(rows, cfg, kind) for kind in KINDS):
        report.write_atomic(out / "table_interface.md", interface_markdown(rows, cfg, env))
    if tokens_current(rows, cfg):
        report.write_atomic(out / "table_tokens.md", tokens_markdown(rows, cfg, env))
    if slopes_current(rows, cfg):
        report.write_atomic(out / "table_slopes.md", slopes_markdown(rows, cfg, env))
