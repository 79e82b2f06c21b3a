"""error_vs_budget.png: two panels per budgeted variant (relative error over KL), one line per input."""

from __future__ import annotations

from pathlib import Path

from efficient_attn import report
from efficient_attn.sweeps.approximation.config import ApproxConfig

__all__ = ["plot_budgets"]


def plot_budgets(cfg: ApproxConfig, rows: list[dict], path: Path, per_row: int = 5) -> None:
    """A grid with two panels per budgeted variant (relative error over KL), one line per
    input; values below 1e-7 (exact up to rounding) are drawn at 1e-7."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter

    ok = [r for r in rows if r and r.get("status") == "ok" and r.get("hyperparameter")]
    variants = sorted({r["variant"] for r in ok})
    cols = max(min(len(variants), per_row), 1)
    grid_rows = max(-(-len(variants) // cols), 1)
    fig, axes = plt.subplots(2 * grid_rows, cols, figsize=(3.3 * cols, 2.6 * 2 * grid_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = [(f"q scale {s}", lambda r, s=s: r["input"] == "gauss" and r["q_scale"] == s and not r["causal"],
               colors[i % len(colors)], "-") for i, s in enumerate(cfg.q_scales)]
    series += [(f"q scale {s}, causal", lambda r, s=s: r["input"] == "gauss" and r["q_scale"] == s and r["causal"],
                colors[i % len(colors)], ":") for i, s in enumerate(cfg.q_scales)]
    series.append(("trained model", lambda r: r["input"] == "trained", "black", "--"))
    for j, variant in enumerate(variants):
        sub = [r for r in ok if r["variant"] == variant]
        values = sorted({r["value"] for r in sub})
        x_of = {v: i for i, v in enumerate(values)}
        g, c = divmod(j, cols)
        for metric, ax in (("rel_err", axes[2 * g, c]), ("kl", axes[2 * g + 1, c])):
            ax.axis("on")
            for label, pick, color, style in series:
                pts = sorted((x_of[r["value"]], max(r[metric], 1e-7), r.get(metric + "_std") or 0.0) for r in sub
                             if pick(r) and r[metric] is not None)
                if pts:
                    xs, ys, es = zip(*pts)
                    ax.errorbar(xs, ys, yerr=es, color=color, linestyle=style, marker="o", ms=3, label=label)
            ax.set_xticks(range(len(values)))
            ax.set_xticklabels([str(v) for v in values], fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_xlabel(sub[0]["hyperparameter"], fontsize=8)
            if ax.has_data():
                ys = [y for line in ax.get_lines() for y in line.get_ydata()]
                if max(ys) / min(ys) > 20:  # several decades: log scale, a few labelled powers of ten
                    ax.set_yscale("log")
                    ax.yaxis.set_major_locator(LogLocator(numticks=5))
                    ax.yaxis.set_minor_formatter(NullFormatter())
            else:
                ax.text(0.5, 0.5, "weights are not a distribution:\nno KL", ha="center", va="center",
                        fontsize=7, transform=ax.transAxes)
            ax.set_title(f"{variant}: {'relative error' if metric == 'rel_err' else 'row KL (nats)'}", fontsize=9)
    handles, labels = report.legend_entries(axes.flat)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8)
    fig.suptitle(f"Error against full attention as the budget grows (N={cfg.seq_len}, preset {cfg.preset}; "
                 f"mean ± std over {len(cfg.seeds)} seeds)", fontsize=10)
    # fixed margins: tight_layout is slow on this grid
    height = 2.6 * 2 * grid_rows
    fig.subplots_adjust(left=0.06, right=0.98, top=1 - 0.6 / height, bottom=0.9 / height, hspace=0.55, wspace=0.3)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
