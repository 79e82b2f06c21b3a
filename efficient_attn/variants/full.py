"""``full``: softmax attention written out with einsums; the ground truth of every exact path.

    A = softmax(Q K^T / sqrt(d) + mask),   out = A V

Time O(T S d), memory O(T S): the [B, H, T, S] score matrix is materialised on purpose,
because this is the readable reference every other variant is tested against.

Non-finite inputs follow ``ops.masks``' rules, and this file defines them for every exact
path: keys no query can see are zeroed before any product, a value row with a NaN or Inf
entry makes the logits of its key NaN (so exactly the queries that see it are NaN, in every
component), and a query that sees no key is zero.
Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Float

from efficient_attn.core import Attention, Capabilities, Mask
from efficient_attn.ops import kv_cache
from efficient_attn.ops.masks import dense_visibility, masked_softmax, split_nonfinite
from efficient_attn.registry import register


@dataclasses.dataclass(frozen=True)
class FullConfig:
    """``full`` has no hyperparameters."""


def full_attention(q, k, v, mask: Mask | None = None):
    """Reference softmax attention on BTHD arrays, computed in float32."""
    B, T, H, D = q.shape
    S = k.shape[1]
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    visible = dense_visibility(mask, B, T, S)
    if visible is not None:  # a key no query sees is read by no product, forward or backward
        used = jnp.broadcast_to(jnp.any(visible, axis=2), (B, H, S)).transpose(0, 2, 1)[..., None]  # [B, S, H, 1]
        kf, vf = jnp.where(used, kf, 0.0), jnp.where(used, vf, 0.0)
    vf, bad = split_nonfinite(vf)
    logits = jnp.einsum("bthd,bshd->bhts", qf, kf) / jnp.sqrt(jnp.float32(D))
    logits = jnp.where(bad.transpose(0, 2, 1)[:, :, None, :], jnp.nan, logits)  # who sees a bad value is NaN
    weights = masked_softmax(logits, visible)
    return jnp.einsum("bhts,bshd->bthd", weights, vf)


@register(
    "full",
    config=FullConfig,
    family="exact",
    citation="Vaswani et al. 2017, Attention Is All You Need",
    fast_exact="blockwise",
)
class FullAttention(Attention):
    """Softmax attention, materialised [B,H,T,S] scores: the reference of every exact path."""

    capabilities = Capabilities(
        causal=True, cross=True, kv_mask=True, dense_mask=True, exact=True, time="O(N^2)", memory="O(N^2)", decode=True
    )

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        return full_attention(q, k, v, mask)

    # decoding: a KV cache of max_len slots, one masked softmax over it per step (O(p d))

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        if getattr(self.config, "softcap", None) is not None or getattr(self.config, "sinks", False):
            raise ValueError("full: decoding with softcap or sinks is not implemented; build without them to decode")
        d = self.dims
        return kv_cache.init_cache(batch, max_len, d.num_kv_heads, d.head_dim, d.head_dim, dtype)

    def _prefill(self, q, k, v, mask: Mask, state):
        return self.attend(q, k, v, mask), kv_cache.write(state.data, k, v, 0, mask.kv_mask)

    def _step(self, q_t, k_t, v_t, state):
        cache = kv_cache.write(state.data, k_t[:, None], v_t[:, None], state.position)
        visible = kv_cache.causal_visible(cache, state.position)
        return kv_cache.attend_dense(q_t, cache.k, cache.v, visible), cache
