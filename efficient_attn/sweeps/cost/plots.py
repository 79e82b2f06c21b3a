"""The cost experiment's plots: log-log curves against N, a panel per pass and masking."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from efficient_attn import report
from efficient_attn.sweeps.cost.analysis import baselines, current, ok, order_key, series
from efficient_attn.sweeps.cost.config import PASS_TITLES, PASSES

if TYPE_CHECKING:
    from efficient_attn.sweeps.cost.config import CostConfig

__all__ = ["plot"]

_BASELINE_COLORS = ("black", "tab:red", "tab:gray", "tab:brown")


def plot(rows: Sequence[dict], cfg: CostConfig, field: str, path: Path, ylabel: str, scale: float,
         bases: Sequence[str] | None = None) -> None:
    """Log-log curves of ``field`` against N, one line per variant (the baselines dashed, in
    fixed colours), a panel per pass (rows) and masking (columns), for ``cfg``'s shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    bases = baselines() if bases is None else tuple(bases)
    groups = series(current(rows, cfg))
    if not groups:
        return
    passes = [p for p in PASSES if any(g[0] == p for g in groups)]
    maskings = [c for c in (False, True) if any(g[1] == c for g in groups)]
    fig, axes = plt.subplots(len(passes), len(maskings), figsize=(5.0 * len(maskings) + 2.2, 4.0 * len(passes)),
                             squeeze=False)
    names = sorted({v for g in groups.values() for v in g}, key=order_key(bases))
    cmap = plt.get_cmap("tab20")
    others = [v for v in names if v not in bases]
    colors = {b: _BASELINE_COLORS[i % len(_BASELINE_COLORS)] for i, b in enumerate(bases)}
    colors.update({v: cmap(i % 20) for i, v in enumerate(others)})
    for i, pass_ in enumerate(passes):
        for j, causal in enumerate(maskings):
            ax = axes[i][j]
            ax.set_title(f"{PASS_TITLES.get(pass_, pass_)}, {'causal' if causal else 'bidirectional'}", fontsize=10)
            for v in names:
                by_n = groups.get((pass_, causal), {}).get(v, {})
                pts = [(n, ok(by_n[n], field)) for n in sorted(by_n) if ok(by_n[n], field)]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                base = v in bases
                ax.plot(xs, [y / scale for y in ys], marker="o", markersize=3, color=colors[v], label=v,
                        linestyle="--" if base else "-", linewidth=2.0 if base else 1.2, zorder=3 if base else 2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = report.legend_entries(axes.flat)
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
