"""The recall sweep's outputs, rebuilt from stored rows only: ``table.md`` (accuracy per pair
count against the state each variant keeps), ``rows.csv``, ``rows.json`` and ``recall.png``
(accuracy against state size, one curve per variant and axis, a panel per pair count)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from efficient_attn import report as ea_report
from efficient_attn.sweeps.recall.config import RecallConfig, points
from efficient_attn.sweeps.recall.state import KV_BOUND

__all__ = ["CSV_COLUMNS", "current", "markdown", "plot", "write_outputs"]

CSV_COLUMNS = ["variant", "family", "axis", "value", "width", "seed", "status", "reason", "test", "state_floats",
               "state_kind", "num_layers", "seq_len", "steps", "wall_s", "cpu_s", "num_params", "fingerprint",
               "reused_from"]


def current(rows: Sequence[dict], cfg: RecallConfig) -> dict[tuple[str, str, int], list[dict]]:
    """Stored rows by (variant, axis, value), only those ``cfg`` would produce (fingerprint, seed)."""
    want = {(p.variant, p.axis, p.value): p.fingerprint(cfg.data_seed)
            for v in cfg.variant_names() for p in points(cfg, v)}
    by: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        k = (r.get("variant"), r.get("axis"), r.get("value"))
        if want.get(k) is not None and r.get("fingerprint") == want[k] and r.get("seed") in cfg.seeds:
            by.setdefault(k, []).append(r)
    return by


def _counts(by) -> list[int]:
    return sorted({int(g) for rs in by.values() for r in rs if r.get("status") == "ok" and r.get("groups")
                   for g in r["groups"]["test"]})


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    a = 100.0 * np.asarray(values, float)
    return f"{a.mean():.1f}" if len(a) == 1 else f"{a.mean():.1f} ± {a.std(ddof=1):.1f}"


def _label(r: dict) -> str:
    if r["axis"] == "width":
        return f"width {r['value']}"
    (knob, value), = r["variant_kwargs"].items()
    return f"{knob}={value} (width {r['width']})"


def markdown(rows: Sequence[dict], cfg: RecallConfig, skipped: dict, env: dict) -> str:
    by = current(rows, cfg)
    counts = _counts(by)
    t, m = cfg.task, cfg.task.model
    params = ", ".join(f"{k}={v}" for k, v in t.params)
    lines = [f"# Recall against state size ({cfg.preset} preset)", "",
             f"MQAR at length {t.seq_len} ({params}), {m.num_layers} layers, {m.num_heads} heads, "
             f"{m.position} positions" + (f", short conv {m.short_conv}" if m.short_conv else "")
             + f", {t.train.steps} steps x {t.train.batch_size}, lr {t.train.lr:g}. Test accuracy (%) of the "
             "best-validation model per pair count, mean ± std over seeds, against the floats each layer keeps to "
             "produce the next token for one sequence (Zoology Fig. 2, Based Fig. 2). Axis 'width': the variant at its "
             "registered defaults in models of that width (MLP 2x); otherwise its budget knob at the width shown.",
             ""]
    body, pending = [], []
    for v in cfg.variant_names():
        if v in skipped:
            continue
        for p in points(cfg, v):
            rs = by.get((p.variant, p.axis, p.value), [])
            ok = [r for r in rs if r["status"] == "ok"]
            if len(ok) < len(cfg.seeds):
                pending.append(f"{v} {p.axis}={p.value} ({len(ok)}/{len(cfg.seeds)})")
            if not ok:
                continue
            r0 = ok[0]
            state = f"{r0['state_floats'] / 1e3:.1f}k" + (" (bound)" if r0["state_kind"] == KV_BOUND else "")
            body.append([v, r0["family"], _label(r0), state]
                        + [_cell([r["groups"]["test"][str(c)] for r in ok if str(c) in r["groups"]["test"]])
                           for c in counts] + [str(len(ok))])
    lines.append(ea_report.markdown_table(["variant", "family", "point", "state floats / layer"]
                                          + [f"pairs={c}" for c in counts] + ["seeds"], body))
    lines += ["## Notes", "",
              "- State: the floating arrays of the variant's empty decoding state (`init_state(1, N)`) where it has the "
              "decode capability; otherwise '(bound)': a KV cache of 2 N H d floats, which any causal attention "
              "can decode with (its true state may be smaller, a window's 2 w H d). The short convolution's "
              f"{max(m.short_conv - 1, 0)} past embeddings per model are the same for every variant and not counted."]
    reused = sorted(f"{r['variant']} {r['axis']}={r['value']} seed {r['seed']}" for rs in by.values() for r in rs
                    if r.get("status") == "ok" and r.get("reused_from"))
    if reused:
        sources = sorted({r["reused_from"] for rs in by.values() for r in rs if r.get("reused_from")})
        lines.append(f"- {len(reused)} points were not trained again: their training is the accuracy experiment's "
                     f"(same variant, seed, model and setting; rows of {', '.join(f'`{x}`' for x in sources)}): "
                     + ", ".join(reused) + ".")
    for v, why in sorted(skipped.items()):
        lines.append(f"- {v}: n/a: {why}")
    errors = [r for rs in by.values() for r in rs if r["status"] != "ok"]
    for r in errors:
        lines.append(f"- {r['variant']} {r['axis']}={r['value']} seed {r['seed']}: error: {r['reason']}")
    if pending:
        lines.append(f"- Not finished: {len(pending)} points have fewer than {len(cfg.seeds)} seeds (the same command "
                     "resumes them): " + ", ".join(pending) + ".")
    lines += ["", f"Environment: jax {env.get('jax')}, flax {env.get('flax')}, {env.get('backend')} "
              f"({env.get('device')}, {env.get('cpu')}, {env.get('cpu_cores')} cores), commit {env.get('commit')}."]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], cfg: RecallConfig, path: Path) -> None:
    """Accuracy against state floats per layer (log), a panel per pair count, a curve per
    (variant, axis); hollow markers: the KV-cache bound, not a measured decoding state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = current(rows, cfg)
    counts = _counts(by) or [0]
    fig, axes = plt.subplots(1, len(counts), figsize=(4.2 * len(counts), 3.8), squeeze=False)
    curves: dict[tuple[str, str], list[tuple[float, list[dict]]]] = {}
    for (v, axis, value), rs in by.items():
        ok = [r for r in rs if r["status"] == "ok"]
        if ok:
            curves.setdefault((v, axis), []).append((ok[0]["state_floats"], ok))
    cmap = plt.get_cmap("tab20")
    names = sorted({v for v, _ in curves})
    for j, c in enumerate(counts):
        ax = axes[0][j]
        for (v, axis), pts in sorted(curves.items()):
            pts.sort(key=lambda p: p[0])
            xs = [x for x, _ in pts]
            ys = [100.0 * np.mean([r["groups"]["test"].get(str(c), np.nan) for r in ok]) for _, ok in pts]
            color = cmap(names.index(v) % 20)
            bound = pts[0][1][0]["state_kind"] == KV_BOUND
            ax.plot(xs, ys, "--" if axis == "budget" else "-", color=color, lw=1,
                    marker="o", mfc="none" if bound else color, ms=4,
                    label=f"{v}" + (" (budget)" if axis == "budget" else "") if j == 0 else None)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("state floats per layer (hollow: KV-cache bound)")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"MQAR, {c} pairs, L={cfg.task.seq_len}", fontsize=9)
        ax.set_ylim(-2, 102)
    if curves:
        fig.legend(fontsize=6, ncol=1, loc="center right")
        fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(out: str | Path, rows: Sequence[dict], cfg: RecallConfig, skipped: dict | None = None) -> list[dict]:
    """table.md, rows.csv, rows.json, recall.png from the stored rows; returns the rows, sorted."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    skipped = dict(skipped or {})
    rows = sorted(rows, key=lambda r: (r.get("variant", ""), r.get("axis", ""), r.get("value", 0), r.get("seed", 0)))
    env = ea_report.environment(cfg.preset)
    ea_report.write_csv(out / "rows.csv", list(rows), CSV_COLUMNS)
    ea_report.write_json(out / "rows.json", {"environment": env, "config": dataclasses.asdict(cfg), "rows": list(rows),
                                             "skipped": [{"variant": v, "reason": w} for v, w in skipped.items()]})
    plot(rows, cfg, out / "recall.png")
    ea_report.write_atomic(out / "table.md", markdown(rows, cfg, skipped, env))
    return list(rows)
