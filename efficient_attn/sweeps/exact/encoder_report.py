"""The encoder throughput table, rebuilt from the stored row only (nothing is measured here)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from efficient_attn import report
from efficient_attn.sweeps.exact.config import ENCODER_MODELS, EncoderBenchConfig
from efficient_attn.sweeps.exact.report import measured_environment, write_table_and_rows

__all__ = ["markdown", "write_outputs", "summary_line", "BASE"]

BASE = "flax_nnx_mha"  # the ratios' denominator
_LABEL = {"flax_nnx_mha": "flax.nnx.MultiHeadAttention", "full": "full (fast_exact: blockwise kernel)",
          "full_einsum": "full (fast_exact=False: einsum)"}


def markdown(rows: Sequence[dict], cfg: EncoderBenchConfig) -> str:
    rows = [r for r in rows if r is not None]
    env = measured_environment(rows)
    lines = ["# Encoder throughput: full against flax.nnx.MultiHeadAttention\n\n",
             f"`nn.Classifier`, {cfg.layers} blocks of width {cfg.emb} with {cfg.heads} heads, batch {cfg.batch} at "
             f"length {cfg.length} (key padding on all but the first sequence), parameters from the same seed. "
             + (f"Measured at commit {env.get('commit')} on {env.get('cpu')} ({env.get('cpu_cores')} cores, "
                f"{env.get('backend')}), jax {env.get('jax')}. " if env else "")
             + f"The training step (forward + backward + AdamW) and the forward of the three models, jitted, warmed "
             f"up ({cfg.warmup} call each), then timed in {cfg.repeats} interleaved rounds; medians; compile time "
             "apart.\n\n"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"Not measured: {r.get('status')}: {r.get('reason')}\n")
            continue
        m = r["models"]
        body = [[_LABEL[name], m[name]["train_tokens_per_s"], m[name]["fwd_tokens_per_s"],
                 m[name]["train_step_s"] * 1e3, m[name]["fwd_s"] * 1e3,
                 m[name]["train_tokens_per_s"] / m[BASE]["train_tokens_per_s"],
                 m[name]["fwd_tokens_per_s"] / m[BASE]["fwd_tokens_per_s"]] for name in ENCODER_MODELS]
        lines.append(report.markdown_table(
            ["model", "train tokens/s", "forward tokens/s", "train step ms", "forward ms", "train x flax",
             "forward x flax"], body))
    return "".join(lines)


def write_outputs(out: Path, rows: Sequence[dict], cfg: EncoderBenchConfig) -> None:
    """table.md and rows.json in ``out``, from ``rows`` only."""
    write_table_and_rows(out, rows, cfg, markdown)


def summary_line(row: dict) -> str:
    if row.get("status") != "ok":
        return f"exact encoder: {row.get('status')}: {row.get('reason')}"
    m = row["models"]
    train = {name: m[name]["train_tokens_per_s"] for name in ENCODER_MODELS}
    return "exact encoder: " + ", ".join(f"{name} {train[name]:.0f} train tok/s ({train[name] / train[BASE]:.2f}x flax)"
                                         for name in ENCODER_MODELS)
