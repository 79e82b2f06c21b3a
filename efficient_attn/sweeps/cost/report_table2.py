"""The LRA Table 2 analog's report, from the stored rows: steps/s and compiled memory of the
scaled-down text classifier per variant and length, with the ratio to the quadratic reference,
beside the published table (``published.PUBLISHED_TABLE2``; Tay et al. 2020, arXiv 2011.04006).
The measurement is ``table2.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from efficient_attn import report
from efficient_attn.sweeps.cost.analysis import baselines, ok, order_key, quadratic_reference
from efficient_attn.sweeps.cost.config import MiB
from efficient_attn.sweeps.cost.published import PUBLISHED_LENGTHS, PUBLISHED_TABLE2, published_baseline

if TYPE_CHECKING:
    from efficient_attn.sweeps.cost.config import CostConfig

__all__ = ["table2_current", "table2_rows", "table2_markdown"]


def table2_current(rows: Sequence[dict], cfg: CostConfig) -> list[dict]:
    t = cfg.table2
    dims = (t.batch, t.num_layers, t.emb_dim, t.num_heads, t.mlp_dim)
    return [r for r in rows if r.get("kind") == "table2"
            and (r.get("batch"), r.get("num_layers"), r.get("emb_dim"), r.get("heads"), r.get("mlp_dim")) == dims]


def table2_rows(rows: Sequence[dict], cfg: CostConfig) -> list[dict]:
    """The Table 2 rows of ``cfg``'s model with ``speedup_vs_full`` and ``memory_vs_full`` (against
    the quadratic reference, ``analysis.quadratic_reference``) filled in."""
    rows = [dict(r) for r in table2_current(rows, cfg)]
    reference = quadratic_reference()
    full = {r["n"]: r for r in rows if r["variant"] == reference}
    for r in rows:
        f = full.get(r["n"])
        v, fv = ok(r, "steps_per_s"), ok(f, "steps_per_s")
        r["speedup_vs_full"] = v / fv if v and fv else None
        m, fm = ok(r, "memory_bytes"), ok(f, "memory_bytes")
        r["memory_vs_full"] = m / fm if m and fm else None
    return rows


def _size(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n}"


def table2_markdown(rows: Sequence[dict], cfg: CostConfig, env: dict) -> str:
    """table2.md: steps/s and memory per variant and length, with LRA's published numbers beside."""
    t = cfg.table2
    rows = table2_rows(rows, cfg)
    reference = quadratic_reference()
    by = {(r["variant"], r["n"]): r for r in rows}
    names = sorted({r["variant"] for r in rows}, key=order_key(baselines()))
    ns = sorted({r["n"] for r in rows})
    lines = [
        f"# LRA Table 2 analog: training speed and memory, byte-level text (preset `{cfg.preset}`)", "",
        f"One optimiser step (forward, backward, AdamW update) of the LRA text classifier scaled down to "
        f"{t.num_layers} layer(s), width {t.emb_dim}, {t.num_heads} heads, MLP {t.mlp_dim}, batch {t.batch}, "
        f"mean pooling, float32, on {env.get('device')} ({env.get('cpu')}). Steps/s = 1 / median step time "
        f"(compile excluded), with the speed-up against `{reference}` in parentheses; memory = compiled "
        f"(`memory_analysis`) arguments + outputs + temporaries of the step in MiB, with the ratio to `{reference}`.",
        "",
        "The LRA columns are the published Table 2 (Tay et al. 2020, 4x4 TPU v3, batch 32, width 256, "
        "4 layers; steps/s with speed-up, peak memory in GB). Compare the ratios, not the absolute "
        "numbers: the hardware, model size and batch differ.", "",
    ]

    def cell(value, ratio, fmt):
        if value is None:
            return None
        return f"{fmt(value)} ({ratio:.2f}x)" if ratio is not None else fmt(value)

    def ours(v, n, field, ratio_field, fmt):
        r = by.get((v, n))
        if r is None:
            return None
        if r.get("status") != "ok":
            return r.get("status")
        return cell(r.get(field), r.get(ratio_field), fmt)

    pub_ns = list(PUBLISHED_LENGTHS)
    head = (["variant"] + [f"steps/s {_size(n)}" for n in ns] + [f"MiB {_size(n)}" for n in ns]
            + ["LRA model"] + [f"LRA steps/s {n // 1024}K" for n in pub_ns] + [f"LRA GB {n // 1024}K" for n in pub_ns])
    body = []
    base = published_baseline()
    for v in names:
        pub = PUBLISHED_TABLE2.get(v)
        row = [v]
        row += [ours(v, n, "steps_per_s", "speedup_vs_full", lambda x: f"{x:.3g}") for n in ns]
        row += [ours(v, n, "memory_bytes", "memory_vs_full", lambda x: f"{x / MiB:.0f}") for n in ns]
        if pub:
            row += [pub[0]]
            row += [f"{s:g} ({s / b:.1f}x)" for s, b in zip(pub[1], base[1])]
            row += [f"{m:g} ({m / b:.2f}x)" for m, b in zip(pub[2], base[2])]
        else:
            row += ["-"] + [None] * (2 * len(pub_ns))
        body.append(row)
    lines.append(report.markdown_table(head, body))
    bad = [r for r in rows if r.get("status") != "ok"]
    late = [r for r in bad if str(r.get("reason", "")).startswith("sweep budget")]
    if bad:
        lines += ["Not measured:", ""]
        lines += [f"- `{r['variant']}` at N={r['n']}: {r['status']}: {r.get('reason', '')[:200]}"
                  for r in bad if r not in late]
        if late:
            lines.append(f"- {len(late)} points not reached within the Table 2 time budget (`budget_s`): "
                         + ", ".join(f"`{r['variant']}` {r['n']}" for r in late[:40])
                         + (", ..." if len(late) > 40 else "") + "; the same command resumes them.")
        lines.append("")
    return "\n".join(lines)
