"""The decode-cost plot: step latency (a panel per batch) and state memory against context."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from efficient_attn import report
from efficient_attn.sweeps.decode_cost.config import MiB

__all__ = ["plot"]


def plot(rows: Sequence[dict], path: Path, base: str) -> None:
    """Log-log curves: per-token step time for each batch, then state memory at the smallest
    batch; one line per variant, the baseline dashed black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    names = sorted({r["variant"] for r in rows}, key=lambda v: (v != base, v))
    cmap = plt.get_cmap("tab20")
    colors = {v: ("black" if v == base else cmap(i % 20)) for i, v in enumerate(names)}
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4.6 * (len(batches) + 1) + 2.2, 4.2), squeeze=False)
    panels = [(f"step latency, batch {b}", "ms per token", "step_median_s", 1e-3, b) for b in batches]
    panels.append((f"state memory, batch {batches[0]}", "MiB", "state_bytes", MiB, batches[0]))
    for ax, (title, ylabel, field, scale, batch) in zip(axes[0], panels):
        for v in names:
            pts = sorted((r["context"], r[field]) for r in rows if r["variant"] == v and r["batch"] == batch
                         and r.get(field) and (field == "state_bytes" or r.get("status") == "ok"))
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, [y / scale for y in ys], marker="o", markersize=3, color=colors[v], label=v,
                    linestyle="--" if v == base else "-", linewidth=2.0 if v == base else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("context length")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = report.legend_entries(axes.flat)
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
