"""The encoder throughput row: the ``full`` encoder against the same model on Flax's attention.

Three ``efficient_attn.nn.Classifier`` encoders of identical sizes, parameters from the same
seed: ``full`` as the models run it (``fast_exact=True``: the exact path on the blockwise
kernel), ``full`` on the einsum reference (``fast_exact=False``), and the model whose every
block's attention is ``flax.nnx.MultiHeadAttention`` (its default ``dot_product_attention``,
the key padding as its boolean mask). For each: the jitted training step (forward + backward
+ AdamW) and the forward, all six programs timed in the same interleaved rounds, so the
ratios of the row come from one run. One row in ``out/rows.jsonl``; a rerun reuses it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import efficient_attn as ea
from efficient_attn import measure, report
from efficient_attn.nn import Classifier, EncoderConfig
from efficient_attn.sweeps.exact.config import ENCODER_MODELS, EncoderBenchConfig
from efficient_attn.sweeps.exact.encoder_report import summary_line, write_outputs
from efficient_attn.sweeps.exact.presets import ENCODER_PRESETS
from efficient_attn.sweeps.exact.timing import time_interleaved
from efficient_attn.sweeps.exact.units import row_environment

__all__ = ["FlaxAttention", "build", "row_key", "measure_row", "run", "rows_of"]


class FlaxAttention(nnx.Module):
    """``nnx.MultiHeadAttention`` behind ``efficient_attn.nn.MultiHeadAttention``'s call signature."""

    def __init__(self, num_heads: int, features: int, *, rngs: nnx.Rngs):
        self.mha = nnx.MultiHeadAttention(num_heads, features, decode=False, rngs=rngs)

    def __call__(self, x, *, context=None, mask: ea.Mask | None = None, positions=None):
        if positions is not None:  # the blocks pass it for rotary / packed rows: Flax's MHA has neither
            raise ValueError("FlaxAttention: flax's MultiHeadAttention has no rotary positions; use position='learned'")
        m = None
        if mask is not None and mask.kv_mask is not None:
            m = mask.kv_mask[:, None, None, :]
        return self.mha(x, context if context is not None else x, mask=m, deterministic=True)


def _encoder_config(cfg: EncoderBenchConfig) -> EncoderConfig:
    return EncoderConfig(vocab_size=cfg.vocab_size, max_len=cfg.length, num_classes=cfg.num_classes,
                         num_layers=cfg.layers, emb_dim=cfg.emb, num_heads=cfg.heads, mlp_dim=2 * cfg.emb,
                         pool="cls")


def build(cfg: EncoderConfig, flax_attention: bool) -> Classifier:
    """The classifier; with ``flax_attention`` every block's attention is Flax's."""
    model = Classifier(cfg, rngs=nnx.Rngs(0))
    if flax_attention:
        for i, block in enumerate(model.trunk.blocks):
            block.attn = FlaxAttention(cfg.num_heads, cfg.emb_dim, rngs=nnx.Rngs(100 + i))
    return model


def models(cfg: EncoderBenchConfig) -> dict[str, Classifier]:
    enc = _encoder_config(cfg)
    made = {"flax_nnx_mha": build(enc, True), "full": build(enc, False),
            "full_einsum": build(dataclasses.replace(enc, fast_exact=False), False)}
    return {name: made[name] for name in ENCODER_MODELS}


def _programs(model: Classifier, cfg: EncoderBenchConfig) -> dict[str, tuple]:
    """The compiled training step and forward of ``model`` with their arguments."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3)
    opt = tx.init(params)
    tokens = jax.random.randint(jax.random.key(1), (cfg.batch, cfg.length), 0, cfg.vocab_size)
    mask = jnp.arange(cfg.length)[None] < jnp.array([cfg.length - 7 * i for i in range(cfg.batch)])[:, None]
    labels = jnp.zeros((cfg.batch,), jnp.int32)

    def forward(p):
        return nnx.merge(graphdef, p, rest)(tokens, mask)

    def step(p, o):
        def loss(p_):
            return optax.softmax_cross_entropy_with_integer_labels(forward(p_), labels).mean()

        updates, o = tx.update(jax.grad(loss)(p), o, p)
        return optax.apply_updates(p, updates), o

    step_c, step_s = measure.compile_function(step, params, opt)
    fwd_c, fwd_s = measure.compile_function(forward, params)
    return {"train": (step_c, (params, opt), step_s), "fwd": (fwd_c, (params,), fwd_s)}


def row_key(cfg: EncoderBenchConfig) -> str:
    return report.RowStore.make_key("encoder", cfg.length, cfg.batch, cfg.layers, cfg.emb, cfg.heads,
                                    cfg.vocab_size, cfg.num_classes, f"repeats={cfg.repeats}",
                                    f"warmup={cfg.warmup}")


def _base_row(cfg: EncoderBenchConfig) -> dict[str, Any]:
    return {"kind": "encoder", "n": cfg.length, "batch": cfg.batch, "layers": cfg.layers, "emb": cfg.emb,
            "heads": cfg.heads}


def measure_row(cfg: EncoderBenchConfig) -> dict[str, Any]:
    """The finished row (status "ok"): per model, tokens per second trained and forwarded."""
    progs = {}
    for name, model in models(cfg).items():
        for part, prog in _programs(model, cfg).items():
            progs[f"{name}/{part}"] = prog
    timings = time_interleaved(progs, repeats=cfg.repeats, warmup=cfg.warmup)
    tokens = cfg.batch * cfg.length
    per_model = {}
    for name in ENCODER_MODELS:
        train, fwd = timings[f"{name}/train"], timings[f"{name}/fwd"]
        per_model[name] = {"train_tokens_per_s": tokens / train["median_s"],
                           "fwd_tokens_per_s": tokens / fwd["median_s"],
                           "train_step_s": train["median_s"], "fwd_s": fwd["median_s"],
                           "compile_s": train["compile_s"] + fwd["compile_s"], "train": train, "fwd": fwd}
    return {**_base_row(cfg), "status": "ok", "models": per_model}


def run(cfg: EncoderBenchConfig, out: str | Path, *, force: bool = False, report_only: bool = False,
        log=print) -> report.RowStore:
    """Measure the row unless ``out/rows.jsonl`` holds it finished; write the table."""
    if report_only and force:
        raise ValueError("exact encoder: report_only=True re-renders the stored row; it cannot be combined "
                         "with force")
    out = Path(out)
    store = report.sweep_store(out / "rows.jsonl", cfg, ENCODER_PRESETS, force=force)
    row = store.get(row_key(cfg))
    if not report_only and (force or row is None or row.get("status") != "ok"):
        try:
            row = measure_row(cfg)
        except Exception as err:  # recorded and retried on a rerun
            first = (str(err).strip().splitlines() or [""])[0]
            row = {**_base_row(cfg), "status": "error", "reason": f"{type(err).__name__}: {first}"}
        row["environment"] = row_environment(cfg.preset)
        store.add(row_key(cfg), row)
        log(summary_line(store.get(row_key(cfg))))
    write_outputs(out, rows_of(cfg, store), cfg)
    return store


def rows_of(cfg: EncoderBenchConfig, store: report.RowStore) -> list[dict]:
    row = store.get(row_key(cfg))
    return [] if row is None else [row]
