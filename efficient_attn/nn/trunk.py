"""The stack both models share: token and position embeddings, pre-LayerNorm ``Block``s, a final
LayerNorm (``_Trunk``).

Positions: a learned table, the fixed ``sinusoidal_table``, or none (``"rotary"``: the
attention rotates queries and keys); packed rows index them by the position within the
segment (``segment_positions``). Dropout takes explicit keys (``_dropout``; None = evaluation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from efficient_attn.core import Mask
from efficient_attn.nn.attention import MultiHeadAttention, _kwargs_dict
from efficient_attn.nn.config import EncoderConfig, LMConfig


def sinusoidal_table(length: int, features: int) -> Float[Array, "L F"]:
    """Fixed position table (Vaswani et al. 2017, sec. 3.5; LRA's ``sinusoidal_init``):

        PE[p, 2i] = sin(p / 10000^(2i/F)),   PE[p, 2i+1] = cos(p / 10000^(2i/F))

    (an odd ``features`` F keeps only the sine of the last pair)."""
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    freq = jnp.exp(-jnp.log(10000.0) * jnp.arange(0, features, 2, dtype=jnp.float32) / features)
    table = jnp.zeros((length, features), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(pos * freq))
    return table.at[:, 1::2].set(jnp.cos(pos * freq)[:, : features // 2])


def segment_positions(segment_ids: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """Each token's position within its segment: t minus the index where its segment starts
    (a segment starts where the id changes; ids as packing writes them, sorted)."""
    T = segment_ids.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


def _dropout(x, rate: float, key):
    """Inverted dropout with an explicit key (None = evaluation: identity)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, cfg: EncoderConfig | LMConfig, *, rngs: nnx.Rngs):
        self.dropout = float(cfg.dropout)
        self.ln1 = nnx.LayerNorm(cfg.emb_dim, rngs=rngs)
        self.attn = MultiHeadAttention(
            cfg.num_heads, cfg.emb_dim, max_len=cfg.attention_len, attention=cfg.attention,
            attention_kwargs=_kwargs_dict(cfg.attention_kwargs), fast_exact=cfg.fast_exact,
            rotary=cfg.position == "rotary", num_kv_heads=cfg.num_kv_heads, rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(cfg.emb_dim, rngs=rngs)
        self.mlp_in = nnx.Linear(cfg.emb_dim, cfg.mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(cfg.mlp_dim, cfg.emb_dim, rngs=rngs)

    def __call__(self, x: Float[Array, "B T F"], mask: Mask | None, dropout_key=None,
                 positions: Int[Array, "B T"] | None = None) -> Float[Array, "B T F"]:
        k1 = k2 = k3 = None
        if dropout_key is not None:
            k1, k2, k3 = jax.random.split(dropout_key, 3)
        x = x + _dropout(self.attn(self.ln1(x), mask=mask, positions=positions), self.dropout, k1)
        h = _dropout(nnx.gelu(self.mlp_in(self.ln2(x))), self.dropout, k2)
        return x + _dropout(self.mlp_out(h), self.dropout, k3)


class _Trunk(nnx.Module):
    """Embeddings + blocks + final LayerNorm, shared by the classifier and the LM."""

    def __init__(self, cfg: EncoderConfig | LMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tok = nnx.Embed(cfg.vocab_size, cfg.emb_dim, rngs=rngs)
        if cfg.position == "learned":
            self.pos = nnx.Embed(cfg.attention_len, cfg.emb_dim, rngs=rngs)
        elif cfg.position == "sinusoidal":  # a constant, not a parameter: the optimiser never sees it
            self.pos_table = nnx.Variable(sinusoidal_table(cfg.attention_len, cfg.emb_dim))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.ln_f = nnx.LayerNorm(cfg.emb_dim, rngs=rngs)

    def run(self, x: Float[Array, "B T F"], mask: Mask | None, dropout_key=None,
            positions: Int[Array, "B T"] | None = None) -> Float[Array, "B T F"]:
        """``positions``: each token's position (None = 0 .. T-1 in every row; packed rows:
        the position within its segment), for the table or the rotary angle."""
        T = x.shape[1]
        if self.cfg.position == "learned":
            x = x + (self.pos(jnp.arange(T))[None] if positions is None else self.pos(positions))
        elif self.cfg.position == "sinusoidal":  # "rotary": positions enter in the attention
            x = x + (self.pos_table[...][:T][None] if positions is None else self.pos_table[...][positions])
        keys = [None] * (len(self.blocks) + 1)
        if dropout_key is not None:
            keys = list(jax.random.split(dropout_key, len(self.blocks) + 1))
        x = _dropout(x, self.cfg.dropout, keys[-1])
        for block, key in zip(self.blocks, keys):
            x = block(x, mask, key, positions)
        return self.ln_f(x)
