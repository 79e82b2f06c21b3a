"""The approximation experiment's outputs, from its stored rows only: table.md, rows.csv,
rows.json, error_vs_budget.png, patterns.png."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from efficient_attn import patterns, registry, report
from efficient_attn.sweeps.approximation.config import ApproxConfig
from efficient_attn.sweeps.approximation.plan import budgets
from efficient_attn.sweeps.approximation.plots import plot_budgets

__all__ = ["markdown", "write_outputs"]


def _pm(mean, std, digits=3) -> str:
    if mean is None:
        return "-"
    fmt = lambda x: f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"  # noqa: E731
    return fmt(mean) + (f" ± {fmt(std)}" if std else "")


def _setting(row: dict) -> str:
    if not row.get("hyperparameter"):
        return "defaults"
    return f"{row['hyperparameter']}={row['value']}"


def _spec(variant: str):
    """The registered spec of a stored row's variant, or None (a plugin not loaded now)."""
    return registry.get_spec(variant) if variant in registry.list_variants() else None


def _gaussian_tables(cfg: ApproxConfig, ok: list[dict]) -> list[str]:
    lines = []
    scales = list(cfg.q_scales)
    for causal in cfg.causal:
        sub = [r for r in ok if r["input"] == "gauss" and r["causal"] == causal]
        if not sub:
            continue
        lines.append(f"\n## Gaussian inputs, {'causal' if causal else 'bidirectional'}\n")
        headers = (["variant", "setting"] + [f"err (q scale {s})" for s in scales]
                   + [f"KL (q scale {s})" for s in scales])
        table = []
        seen = []
        for r in sub:
            ident = (r["variant"], _setting(r))
            if ident not in seen:
                seen.append(ident)
        for variant, setting in seen:
            cells = {r["q_scale"]: r for r in sub if (r["variant"], _setting(r)) == (variant, setting)}
            errs = [_pm(cells[s]["rel_err"], cells[s]["rel_err_std"]) if s in cells else "-" for s in scales]
            kls = [_pm(cells[s]["kl"], cells[s]["kl_std"]) if s in cells else "-" for s in scales]
            table.append([variant, setting] + errs + kls)
        lines.append(report.markdown_table(headers, table))
    return lines


def _trained_table(cfg: ApproxConfig, ok: list[dict], extra: dict) -> list[str]:
    tr = [r for r in ok if r["input"] == "trained"]
    if not tr or cfg.trained is None:
        return []
    t = cfg.trained
    acc = extra.get("test_accuracy")
    majority = extra.get("majority", float("nan"))
    lines = [f"\n## q, k, v of a trained full model ({t.task}, layer {t.layer}, {cfg.batch} examples)\n"]
    lines.append(
        f"A {t.num_layers}-layer, width-{cfg.num_heads * cfg.head_dim}, {cfg.num_heads}-head full-attention "
        f"Classifier trained {t.steps} steps on {t.task} at length {cfg.seq_len - 1} (+ CLS)"
        + (f"; test accuracy {acc:.3f} (majority class {majority:.3f})" if acc is not None else "")
        + ". Padding is passed as kv_mask; errors count real queries only. mean ± std over module seeds.\n")
    headers = ["variant", "setting", "rel. error", "KL", "neg. mass / row"]
    lines.append(report.markdown_table(headers, [
        [r["variant"], _setting(r), _pm(r["rel_err"], r["rel_err_std"]), _pm(r["kl"], r["kl_std"]),
         _pm(r["neg_mass"], None)] for r in tr]))
    return lines


def _notes(rows: list[dict], ok: list[dict], skipped: list[dict]) -> list[str]:
    lines = ["\n## Notes\n"]
    present = sorted({r["variant"] for r in ok})
    specs = {v: _spec(v) for v in present}
    learned = [v for v in present if specs[v] is not None and registry.has_parameters(v)]
    if learned:
        lines.append(f"- Untrained learned variants: {', '.join(learned)} are measured at initialisation (random "
                     "projections, logits, sorting networks); their errors say nothing about a trained model.")
    signed = sorted({r["variant"] for r in ok if not r["distribution"]})
    if signed:
        masses = {v: max((r["neg_mass"] or 0.0) for r in ok if r["variant"] == v) for v in signed}
        lines.append("- Not a distribution (signed or unnormalised implied weights, so no KL): "
                     + ", ".join(f"{v} (negative mass per row up to {masses[v]:.2g})" for v in signed) + ".")
    bad = sorted({r["variant"] for r in ok if r["consistency"] is not None and r["consistency"] > 1e-3})
    lines.append("- Probe check (||A V - out|| / ||out||, A from one-hot probing): "
                 + (f"above 1e-3 for {', '.join(bad)}: their implied weights do not reproduce their output "
                    "(not linear in V, or randomness that differs across the batch)." if bad
                    else "below 1e-3 for every row: each variant's output is A V with the A drawn in patterns.png."))
    shared = [v for v in present if specs[v] is not None and specs[v].capabilities.shared_qk]
    if shared:
        lines.append(f"- Shared-QK variants ({', '.join(shared)}) ignore k (their keys are the normalised queries): "
                     "they are compared with full attention on those keys, self excluded unless alone, the function "
                     "they approximate. In patterns.png they are drawn on the pictures' q (their keys being those q), "
                     "beside full on independent k.")
    lines.append("- Relative error: with flat attention (small q scale) full's output is close to the mean of V, "
                 "whose norm is small, so relative errors are large; an error above 1 means the output is farther "
                 "from full's than zero is. Values of ~1e-7 are exact up to rounding (the budget covers every key).")
    lines.append("- KL smoothing: the variant's weights are mixed with 1e-6 of the uniform distribution over visible "
                 "keys, so a key full attends to and the variant never sees costs about 13.8 nats per unit of weight.")
    for s in skipped:
        causal = " (causal)" if s["causal"] else ""
        lines.append(f"- Skipped: {s['variant']} on {s['input']} inputs{causal}: {s['reason']}.")
    notes = sorted({(r["variant"], r.get("budget_note")) for r in rows if r and r.get("budget_note")})
    for variant, note in notes:
        lines.append(f"- {variant}: {note}; measured at its defaults only.")
    for r in rows:
        if r and r.get("status") == "error":
            lines.append(f"- Error: {r['variant']} {_setting(r)} ({r['input']}): {r['error']}")
    return lines


def markdown(cfg: ApproxConfig, rows: list[dict], skipped: list[dict], extra: dict) -> str:
    """table.md: the Gaussian tables per masking, the trained model's table, the notes."""
    ok = [r for r in rows if r and r.get("status") == "ok"]
    lines = [f"# Approximation error against full attention ({cfg.preset})\n"]
    lines.append(
        f"Relative output error ||out - full|| / ||full|| and mean row KL(full || variant) (nats) of the "
        f"attention weights each variant implies (found by probing with one-hot values), as each variant's "
        f"budget grows. Gaussian inputs: N = {cfg.seq_len}, batch {cfg.batch}, {cfg.num_heads} heads of "
        f"{cfg.head_dim}; q scaled so the logits' std is the q scale; mean ± std over {len(cfg.seeds)} seeds "
        f"(new inputs and a new module initialisation each).\n")
    lines += _gaussian_tables(cfg, ok)
    lines += _trained_table(cfg, ok, extra)
    lines += _notes(rows, ok, skipped)
    return "\n".join(lines) + "\n"


def write_outputs(cfg: ApproxConfig, rows: list[dict], skipped: list[dict], panels: dict, out: Path,
                  extra: dict | None = None) -> None:
    """Every output file from the rows (``None`` entries, units not measured, are left out)."""
    extra = extra or {}
    rows = [r for r in rows if r]
    out = Path(out)
    report.write_atomic(out / "table.md", markdown(cfg, rows, skipped, extra))
    report.write_csv(out / "rows.csv", rows)
    report.write_json(out / "rows.json", {
        "environment": report.environment(cfg.preset),
        "config": dataclasses.asdict(cfg),
        "budgets": dict(budgets()),
        "trained_model": extra,
        "skipped": skipped,
        "rows": rows,
    })
    plot_budgets(cfg, rows, out / "error_vs_budget.png")
    patterns.draw_patterns(
        out / "patterns.png", panels, reference=registry.exact_reference(),
        title=f"Implied attention weights (head 0), N={cfg.pattern_len}, structured q, k; colour scale = full's max",
    )
