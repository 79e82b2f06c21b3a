"""The interface part's report, from the stored rows: grouped-query rows (time and temporary
memory against Hkv = H) and packed against padded batches of the same tokens beside the ideal
ratios of their lengths (``interface_summary``), written as table_interface.md. The
measurement is ``interface.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from efficient_attn import report
from efficient_attn.sweeps.cost.analysis import baselines, ok, order_key
from efficient_attn.sweeps.cost.config import INTERFACE_KINDS as KINDS
from efficient_attn.sweeps.cost.config import LAYOUTS, PACKING_KINDS, PASSES

if TYPE_CHECKING:
    from efficient_attn.sweeps.cost.config import CostConfig

__all__ = ["interface_current", "interface_summary", "interface_markdown"]


def interface_current(rows: Sequence[dict], cfg: CostConfig, kind: str) -> list[dict]:
    """The rows of ``kind`` ("gqa", "packing", "packing_equal") measured at ``cfg``'s interface shape."""
    i = cfg.interface
    dims = (i.heads, cfg.head_dim, cfg.dtype)
    out = [r for r in rows if r.get("kind") == kind and (r.get("heads"), r.get("head_dim"), r.get("dtype")) == dims]
    if kind == "gqa":
        return [r for r in out if r.get("batch") == cfg.batch]
    if kind == "packing_equal":
        return [r for r in out if r.get("equal_segments") == i.equal_segments]
    return [r for r in out if r.get("seed") == cfg.seed and r.get("segment_range") == list(i.segment_range)]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def interface_summary(rows: Sequence[dict], cfg: CostConfig) -> dict[str, list[dict]]:
    """What table_interface.md shows, from the stored rows only, per (variant, pass, N):

    "gqa": ``time`` / ``temp`` per kv head count, and ``time_ratio`` / ``temp_ratio`` against
    Hkv = H (None where either side was not measured);
    "packing": the lengths (``k``, ``longest``), ``time`` / ``temp`` per layout, the measured
    ``padded_over_packed_*`` ratios, ``packed_over_unsegmented`` (the packed row's time over one
    unsegmented row of N: the gqa row with Hkv = H at batch 1, where there is one) and the
    ideals of the lengths: ``ideal_packed`` = sum(l^2) / N^2, ``ideal_padded_over_packed`` =
    k * max(l)^2 / sum(l^2);
    "packing_equal": the same for the k equal sequences of N / k.
    """
    heads = cfg.interface.heads
    key = lambda r: (r["variant"], r["pass"], int(r["n"]))  # noqa: E731
    order = lambda g: (order_key(baselines())(g[0]), PASSES.index(g[1]) if g[1] in PASSES else 9, g[2])  # noqa: E731

    gqa: dict[tuple, dict[int, dict]] = {}
    for r in interface_current(rows, cfg, "gqa"):
        gqa.setdefault(key(r), {})[int(r["num_kv_heads"])] = r
    gqa_out = []
    for g in sorted(gqa, key=order):
        by = gqa[g]
        times = {h: ok(r, "time_median_s") for h, r in by.items()}
        temps = {h: ok(r, "temp_bytes") for h, r in by.items()}
        gqa_out.append({"variant": g[0], "pass": g[1], "n": g[2], "rows": by, "time": times, "temp": temps,
                        "time_ratio": {h: _ratio(t, times.get(heads)) for h, t in times.items()},
                        "temp_ratio": {h: _ratio(m, temps.get(heads)) for h, m in temps.items()}})

    unsegmented = {key(r): r for r in rows if r.get("kind") == "gqa" and r.get("batch") == 1
                   and r.get("num_kv_heads") == heads
                   and (r.get("heads"), r.get("head_dim"), r.get("dtype")) == (heads, cfg.head_dim, cfg.dtype)}
    out = {"gqa": gqa_out}
    for kind in PACKING_KINDS:
        out[kind] = _packing_summary(interface_current(rows, cfg, kind), unsegmented, key, order)
    return out


def _packing_summary(rows: Sequence[dict], unsegmented: dict, key, order) -> list[dict]:
    """``interface_summary``'s entries of one packing kind (its docstring)."""
    packing: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        packing.setdefault(key(r), {})[r["layout"]] = r
    packing_out = []
    for g in sorted(packing, key=order):
        by = packing[g]
        lens = next((r["segment_lengths"] for r in by.values() if r.get("segment_lengths")), None)
        times = {layout: ok(by.get(layout), "time_median_s") for layout in LAYOUTS}
        temps = {layout: ok(by.get(layout), "temp_bytes") for layout in LAYOUTS}
        entry = {"variant": g[0], "pass": g[1], "n": g[2], "rows": by, "time": times, "temp": temps,
                 "k": len(lens) if lens else None, "longest": max(lens) if lens else None,
                 "padded_over_packed_time": _ratio(times["padded"], times["packed"]),
                 "padded_over_packed_temp": _ratio(temps["padded"], temps["packed"]),
                 "packed_over_unsegmented": _ratio(times["packed"], ok(unsegmented.get(g), "time_median_s")),
                 "ideal_packed": None, "ideal_padded_over_packed": None}
        if lens:
            squares = sum(x * x for x in lens)
            entry["ideal_packed"] = squares / g[2] ** 2
            entry["ideal_padded_over_packed"] = len(lens) * max(lens) ** 2 / squares
        packing_out.append(entry)
    return packing_out


def _status_or(r: dict | None, value: float | None, scale) -> Any:
    """``value`` scaled where measured; else the row's status (skipped / error), or None."""
    if value is not None:
        return scale(value)
    return None if r is None else ("skip" if r.get("status") == "skipped" else r.get("status"))


def interface_markdown(rows: Sequence[dict], cfg: CostConfig, env: dict) -> str:
    """table_interface.md: grouped-query heads, then packed against padded batches."""
    i = cfg.interface
    summary = interface_summary(rows, cfg)
    lo, hi = i.segment_range
    lines = [
        f"# Interface of current models: grouped-query heads and packed batches (preset `{cfg.preset}`)", "",
        f"The exact baselines with each capability, bidirectional, {cfg.dtype}, head width D={cfg.head_dim}, on "
        f"{env.get('device')} ({env.get('cpu')}). Time: median per call after a warm-up, compile apart, as in "
        "table.md. Memory: compiled temporary bytes of one call (`temp_bytes`, what it allocates beyond its "
        "arguments and outputs; arguments + outputs + temporaries are `memory_bytes` in rows.csv). "
        "`skip`: over a budget or not reached (reason in rows.csv).", "",
    ]
    if summary["gqa"]:
        kv = sorted({h for e in summary["gqa"] for h in e["rows"]}, reverse=True)
        others = [h for h in kv if h != i.heads]
        lines += [f"## Grouped-query attention (H = {i.heads} query heads, B = {cfg.batch})", "",
                  f"Hkv key/value heads; query head h reads kv head h // (H / Hkv). Ratios are against "
                  f"Hkv = {i.heads} (each query head its own kv head).", ""]
        head = (["variant", "pass", "N"] + [f"ms Hkv={h}" for h in kv] + [f"time {h}/{i.heads}" for h in others]
                + [f"temp MiB Hkv={h}" for h in kv] + [f"temp {h}/{i.heads}" for h in others])
        body = []
        for e in summary["gqa"]:
            body.append([e["variant"], e["pass"], e["n"]]
                        + [_status_or(e["rows"].get(h), e["time"].get(h), report.to_ms) for h in kv]
                        + [e["time_ratio"].get(h) for h in others]
                        + [_status_or(e["rows"].get(h), e["temp"].get(h), report.to_mib) for h in kv]
                        + [e["temp_ratio"].get(h) for h in others])
        lines += [report.markdown_table(head, body)]
    if summary["packing"]:
        lines += [f"## Packed against padded (H = {i.heads})", "",
                  f"The same N tokens: k sequences of seeded lengths in [{lo:g} N, {hi:g} N] summing to N. "
                  "Packed: one row of N tokens with sorted segment ids (a query sees its own sequence only). "
                  "Padded: k rows as long as the longest sequence, with kv_mask and q_mask. "
                  "`packed/unsegmented`: the packed row's time over one row of N tokens without ids (the "
                  f"Hkv = {i.heads} grouped-query row at B = 1). Ideal packed/unsegmented = sum(l^2) / N^2, "
                  "the share of query-key pairs a packed row needs; ideal padded/packed = k max(l)^2 / sum(l^2). "
                  "An engine that skips the tiles whose segments cannot meet approaches the ideals from above "
                  "as its tiles shrink against the sequences; a dense engine computes all N^2 pairs of the "
                  "packed row whatever the ids, so for it padding is the cheaper layout.", ""]
        lines += [_packing_table(summary["packing"])]
    if summary["packing_equal"]:
        k = i.equal_segments
        lines += [f"## Packed against padded, {k} equal sequences (H = {i.heads})", "",
                  f"As above for k = {k} sequences of N / {k} tokens each (at N = {k}K: {k} x 1K^2 query-key pairs "
                  f"against {k * k} x 1K^2 unsegmented): ideal packed/unsegmented = 1/{k}, "
                  "ideal padded/packed = 1. Where N / k is a multiple of the engine's tile, no visited tile holds "
                  "two sequences, so the gap to the ideal is the cost of the tile skipping and the in-tile "
                  "segment mask themselves.", ""]
        lines += [_packing_table(summary["packing_equal"])]
    bad = [r for kind in KINDS for r in interface_current(rows, cfg, kind) if r.get("status") != "ok"]
    late = [r for r in bad if str(r.get("reason", "")).startswith("sweep budget")]
    if bad:
        lines += ["Not measured:", ""]
        lines += [f"- {_interface_label(r)}: {r['status']}: {r.get('reason', '')[:200]}" for r in bad if r not in late]
        if late:
            lines.append(f"- {len(late)} points not reached within the interface part's time budget (`budget_s`): "
                         + ", ".join(_interface_label(r) for r in late[:40])
                         + (", ..." if len(late) > 40 else "") + "; the same command resumes them.")
        lines.append("")
    return "\n".join(lines)


def _packing_table(entries: Sequence[dict]) -> str:
    head = ["variant", "pass", "N", "k", "longest", "ms packed", "ms padded", "padded/packed time",
            "temp MiB packed", "temp MiB padded", "padded/packed temp", "packed/unsegmented",
            "ideal packed/unsegmented", "ideal padded/packed"]
    body = []
    for e in entries:
        rs = e["rows"]
        body.append([e["variant"], e["pass"], e["n"], e["k"], e["longest"],
                     _status_or(rs.get("packed"), e["time"]["packed"], report.to_ms),
                     _status_or(rs.get("padded"), e["time"]["padded"], report.to_ms), e["padded_over_packed_time"],
                     _status_or(rs.get("packed"), e["temp"]["packed"], report.to_mib),
                     _status_or(rs.get("padded"), e["temp"]["padded"], report.to_mib), e["padded_over_packed_temp"],
                     e["packed_over_unsegmented"], e["ideal_packed"], e["ideal_padded_over_packed"]])
    return report.markdown_table(head, body)


def _interface_label(r: dict) -> str:
    setting = f"Hkv={r.get('num_kv_heads')}" if r.get("kind") == "gqa" else r.get("layout")
    return f"{r.get('kind')} `{r.get('variant')}` {r.get('pass')} N={r.get('n')} {setting}"
