"""Throughput of the ``full`` encoder against the same model on ``flax.nnx.MultiHeadAttention``.

Both models are ``efficient_attn.nn.Classifier`` with identical sizes, parameters initialised
from the same seed; in the second, every block's attention is ``nnx.MultiHeadAttention`` with
its default ``attention_fn`` (``nnx.dot_product_attention``) and the key padding given as its
boolean mask. Measured: training tokens per second (forward + backward + AdamW, jitted,
warmed up, median of repeats inside ``block_until_ready``; compile time apart) and forward
tokens per second, at length 1024 by default. Three models: ``full`` as the models run it
(``fast_exact=True``: the exact path on the blockwise kernel), ``full`` on the einsum
reference (``fast_exact=False``), and Flax's. Writes ``results/exact/encoder.json``.

    python experiments/bench_encoder.py [--length 1024 --batch 4 --repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import efficient_attn as ea
from efficient_attn import report
from efficient_attn.nn import Classifier, EncoderConfig


class FlaxAttention(nnx.Module):
    """``nnx.MultiHeadAttention`` behind ``efficient_attn.nn.MultiHeadAttention``'s call signature."""

    def __init__(self, num_heads: int, features: int, *, rngs: nnx.Rngs):
        self.mha = nnx.MultiHeadAttention(num_heads, features, decode=False, rngs=rngs)

    def __call__(self, x, *, context=None, mask: ea.Mask | None = None):
        m = None
        if mask is not None and mask.kv_mask is not None:
            m = mask.kv_mask[:, None, None, :]
        return self.mha(x, context if context is not None else x, mask=m, deterministic=True)


def build(cfg: EncoderConfig, flax_attention: bool) -> Classifier:
    model = Classifier(cfg, rngs=nnx.Rngs(0))
    if flax_attention:
        for i, block in enumerate(model.trunk.blocks):
            block.attn = FlaxAttention(cfg.num_heads, cfg.emb_dim, rngs=nnx.Rngs(100 + i))
    return model


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(model: Classifier, batch: int, length: int, repeats: int) -> dict:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3)
    opt = tx.init(params)
    tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, model.cfg.vocab_size)
    mask = jnp.arange(length)[None] < jnp.array([length - 7 * i for i in range(batch)])[:, None]
    labels = jnp.zeros((batch,), jnp.int32)

    def forward(p):
        return nnx.merge(graphdef, p, rest)(tokens, mask)

    def step(p, o):
        loss = lambda p_: optax.softmax_cross_entropy_with_integer_labels(forward(p_), labels).mean()  # noqa: E731
        grads = jax.grad(loss)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    t = time.perf_counter()
    step_c = jax.jit(step).lower(params, opt).compile()
    fwd_c = jax.jit(forward).lower(params).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(step_c(params, opt))
    jax.block_until_ready(fwd_c(params))
    train_s = _median_time(lambda: step_c(params, opt), repeats)
    fwd_s = _median_time(lambda: fwd_c(params), repeats)
    n = batch * length
    return {"train_tokens_per_s": n / train_s, "fwd_tokens_per_s": n / fwd_s, "train_step_s": train_s,
            "fwd_s": fwd_s, "compile_s": compile_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--emb", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("results/exact/encoder.json"))
    args = p.parse_args(argv)
    cfg = EncoderConfig(vocab_size=256, max_len=args.length, num_classes=10, num_layers=args.layers,
                        emb_dim=args.emb, num_heads=args.heads, mlp_dim=2 * args.emb, pool="cls")
    models = {
        "flax_nnx_mha": build(cfg, True),
        "full": build(cfg, False),
        "full_einsum": build(dataclasses.replace(cfg, fast_exact=False), False),
    }
    res = {name: measure(m, args.batch, args.length, args.repeats) for name, m in models.items()}
    flax_ = res["flax_nnx_mha"]
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": report.environment("bench_encoder"),
        **res,
        "train_ratio_full_over_flax": res["full"]["train_tokens_per_s"] / flax_["train_tokens_per_s"],
        "fwd_ratio_full_over_flax": res["full"]["fwd_tokens_per_s"] / flax_["fwd_tokens_per_s"],
        "train_ratio_full_einsum_over_flax": res["full_einsum"]["train_tokens_per_s"] / flax_["train_tokens_per_s"],
    }
    print(json.dumps(result, indent=2))
    report.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
