"""The accuracy experiment's plots, from the stored rows: validation curves, and accuracy
against the attention's cost as the cost experiment measured it (its ``rows.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from efficient_attn.sweeps.accuracy.config import TASK_TITLES, AccuracyConfig, current_rows

__all__ = ["load_cost", "cost_at", "plot_pareto", "plot_curves"]


def load_cost(cost_dir: Path) -> list[dict] | None:
    """The cost experiment's finished kernel rows under ``cost_dir``, or None if it has none."""
    path = cost_dir / "rows.json"
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    rows = obj.get("rows", obj) if isinstance(obj, dict) else obj
    return [r for r in rows if isinstance(r, dict) and r.get("status", "ok") == "ok"
            and r.get("kind", "cost") == "cost" and r.get("time_median_s")]


def cost_at(cost: list[dict], variant: str, n: int, causal: bool) -> dict | None:
    """The cost row of ``variant`` at the smallest measured N >= n (else the largest): the
    training pass (fwd_bwd) where measured, else the forward pass."""
    for pass_ in ("fwd_bwd", "fwd"):
        cands = [r for r in cost if r.get("variant") == variant and r.get("pass") == pass_
                 and bool(r.get("causal")) == causal]
        if cands:
            above = [r for r in cands if r["n"] >= n]
            return min(above, key=lambda r: r["n"]) if above else max(cands, key=lambda r: r["n"])
    return None


def plot_pareto(rows: Sequence[dict], cfg: AccuracyConfig, cost: list[dict] | None, path: Path) -> str:
    """Accuracy (or bits/byte) against fwd+bwd time and memory of the attention at the task's
    length; returns the sentence the table prints about where the costs came from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    by = current_rows(rows, cfg)
    tasks = [s for s in cfg.tasks if any(t == s.task for _, t in by)]
    if cost is None or not tasks:
        fig, ax = plt.subplots(figsize=(6, 3))
        msg = "cost results missing: run cost_scaling first" if cost is None else "no accuracy rows yet"
        ax.text(0.5, 0.5, msg, ha="center", va="center", fontsize=12)
        ax.set_axis_off()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return msg
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7), squeeze=False)
    used_n = {}
    for j, s in enumerate(tasks):
        for i, (field, label, scale) in enumerate((("time_median_s", "attention time (ms)", 1e3),
                                                   ("memory_bytes", "compiled memory (MiB)", 1 / 2**20))):
            ax = axes[i][j]
            pts = []
            for (v, t), rs in by.items():
                ok = [r for r in rs if r["status"] == "ok" and t == s.task]
                if not ok:
                    continue
                # a classifier with a CLS token attends over one position more than the sequence
                attn_len = s.seq_len + (1 if s.model.pool == "cls" and ok[0]["metric"] != "bits_per_byte"
                                        and not ok[0]["causal"] else 0)
                c = cost_at(cost, v, attn_len, bool(ok[0]["causal"]))
                if c is None or c.get(field) is None:
                    continue
                used_n.setdefault(s.task, set()).add((c["n"], c["pass"]))
                bpb = ok[0]["metric"] == "bits_per_byte"
                y = float(np.mean([r["test"] for r in ok])) * (1.0 if bpb else 100.0)
                pts.append((c[field] * scale, y, v, bpb))
            for x, y, v, _ in pts:
                ax.scatter(x, y, s=20)
                ax.annotate(v, (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
            if pts:
                lower_better = pts[0][3]
                front, best = [], None
                for x, y, _, _ in sorted(pts):
                    if best is None or (y < best if lower_better else y > best):
                        front.append((x, y))
                        best = y
                ax.plot(*zip(*front), "k--", lw=0.8, alpha=0.6)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(label)
            metric = "bits/byte (lower better)" if pts and pts[0][3] else "test accuracy %"
            ax.set_ylabel(metric)
            at = ", ".join(f"N={n} {p}" for n, p in sorted(used_n.get(s.task, ()))) or "no cost rows"
            ax.set_title(f"{TASK_TITLES.get(s.task, s.task)} (cost: {at})", fontsize=8)
    fig.suptitle(f"accuracy vs attention cost ({cfg.preset}); dashed: Pareto front", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    if not used_n:
        return "the cost experiment has no finished rows for these variants yet"
    return ("accuracy against the cost experiment's time and compiled memory of the attention (fwd_bwd where "
            "measured, else fwd) at the smallest measured N >= the task's attention length: "
            + "; ".join(f"{k} at " + ", ".join(f"N={n} {p}" for n, p in sorted(v)) for k, v in used_n.items()))


def plot_curves(rows: Sequence[dict], cfg: AccuracyConfig, path: Path) -> None:
    """Validation metric against step, one panel per task, one line per (variant, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = current_rows(rows, cfg)
    fig, axes = plt.subplots(1, len(cfg.tasks), figsize=(4.5 * len(cfg.tasks), 3.6), squeeze=False)
    for j, s in enumerate(cfg.tasks):
        ax = axes[0][j]
        variants = sorted(v for v, t in by if t == s.task)
        cmap = plt.get_cmap("tab20")
        metric = None
        for k, v in enumerate(variants):
            for n, r in enumerate(rr for rr in by[(v, s.task)] if rr["status"] == "ok"):
                metric = r["metric"]
                h = r.get("history") or []
                xs = [p["step"] for p in h]
                ys = [p.get(f"val_{metric}") for p in h]
                ax.plot(xs, ys, color=cmap(k % 20), lw=1, label=v if n == 0 else None)
        ax.set_title(TASK_TITLES.get(s.task, s.task))
        ax.set_xlabel("step")
        ax.set_ylabel(f"val {metric or ''}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
