"""``streaming``: a sliding window of recent tokens plus a few always-visible "sink" tokens.

StreamingLLM (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks",
ICLR). Softmax LMs put large attention weight on the first tokens whatever they hold; a
plain sliding window that evicts them breaks down, so the first s = ``num_sinks`` tokens
stay visible to every query beside the w = ``window`` most recent ones:

    causal:         N(i) = { j : i - w < j <= i }  u  { j : j < s, j <= i }
    bidirectional:  N(i) = { j : |i - j| < w }     u  { j : j < s }
    out_i = sum_{j in N(i)} softmax_j(q_i . k_j / sqrt(d)) v_j        (kv_mask removes keys)

(w counts the query itself: causal, a query sees w recent keys, the cache of the paper.)
The paper is about causal decoding; the bidirectional form is the same picture with the
window on both sides, so the same variant serves encoders (the sinks are then global keys,
not global queries). Sinks are positions 0..s-1 of the sequence as given, whether or not
they are real (a padded sink is masked like any padded key). The paper also re-numbers
positions inside the rolling cache for its position encoding; here positions are the
caller's (rotary is applied before any core), which is the paper's "window attention with
sinks" pattern at training time, not its cache re-indexing.

Computed on the block-sparse engine (ops/block_sparse.py) as two disjoint key sets merged
into one softmax by logsumexp weighting (``merge_softmax``, as ``longformer`` adds its
global keys): the window part uses a banded table over blocks of ``b = clip(w, 16, 128)``
tokens with a token-level band mask, the sinks excluded (kv_valid) so that no key counts
twice; the sink part is one block of the s sink keys seen by every query block (causal
inside it). One table listing block 0 beside the band would not do: the engine ANDs its band
mask with every listed block, so it would hide the sinks of every query past the window.
Time O(N (w + s) d); no N x N array; memory O(N d) plus one run of the engine.

What the experiments need to know. Budget: ``window``. Exact limit: window >= N is full
attention. Defaults: w = 64, s = 4 (the paper's four sinks; its cache is much larger, 1K-4K,
for contexts far beyond this project's).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from efficient_attn.core import Attention, Capabilities, Mask, check_positive_int
from efficient_attn.ops import kv_cache
from efficient_attn.ops.block_sparse import (
    band_block_size,
    banded_table,
    block_sparse_attention,
    merge_softmax,
    num_blocks,
)
from efficient_attn.registry import Budget, register

__all__ = ["StreamingConfig", "StreamingAttention", "streaming_attention"]


@dataclasses.dataclass(frozen=True)
class StreamingConfig:
    """window: recent tokens seen (the query included); num_sinks: first tokens always seen."""

    window: int = 64
    num_sinks: int = 4

    def __post_init__(self):
        check_positive_int("streaming", "window", self.window)
        check_positive_int("streaming", "num_sinks", self.num_sinks, minimum=0)


def streaming_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T H D"],
    v: Float[Array, "B T H Dv"],
    *,
    window: int,
    num_sinks: int,
    causal: bool,
    kv_mask: Bool[Array, "B T"] | None = None,
) -> Float[Array, "B T H Dv"]:
    """Sinks + sliding window on BTHD arrays (float32 result)."""
    B, T, H, D = q.shape
    s = min(num_sinks, T)
    real = jnp.ones((B, T), bool) if kv_mask is None else kv_mask
    # masked keys become zeros before any product: NaN or inf there cannot reach an output
    k, v = (jnp.where(real[:, :, None, None], x, jnp.zeros((), x.dtype)) for x in (k, v))
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))

    left = window - 1
    right = 0 if causal else window - 1
    b = band_block_size(left, T)
    nb = num_blocks(T, b)
    not_sink = jnp.arange(T) >= s
    out, lse = block_sparse_attention(
        qh, kh, vh, banded_table(nb, nb, b, b, left, right), block_q=b, block_k=b,
        causal=causal, kv_valid=jnp.logical_and(real, not_sink[None]), band=(left, right),
    )
    if s == 0:
        return out.transpose(0, 2, 1, 3)
    out_s, lse_s = block_sparse_attention(
        qh, kh[:, :, :s], vh[:, :, :s], np.zeros((nb, 1), np.int32), block_q=b, block_k=s,
        causal=causal, kv_valid=real[:, :s],
    )
    out, _ = merge_softmax([out, out_s], [lse, lse_s])
    return out.transpose(0, 2, 1, 3)


@register(
    "streaming",
    config=StreamingConfig,
    family="streaming",
    citation="Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks",
    budget=Budget("window", (4, 8, 16, 32, 64, 128, 256), length_like=True),
    pattern_setting={"window": 8},
    exact_limit=lambda n: {"window": n},
)
class StreamingAttention(Attention):
    """StreamingLLM: the first `num_sinks` tokens plus a sliding window of `window` recent ones."""

    capabilities = Capabilities(
        causal=True, cross=False, kv_mask=True, exact=False, time="O(N (w + s))", memory="O(N + w^2)", decode=True
    )

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        cfg = self.config
        return streaming_attention(
            q, k, v, window=cfg.window, num_sinks=cfg.num_sinks, causal=mask.causal, kv_mask=mask.kv_mask
        )

    # decoding: the sinks in s fixed slots and the window in a ring buffer of w slots (memory
    # O((s + w) d), independent of the context), one softmax over both per step

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        d, cfg = self.dims, self.config
        s = min(cfg.num_sinks, max_len)
        shape = (d.num_kv_heads, d.head_dim, d.head_dim, dtype)
        sinks = kv_cache.init_cache(batch, s, *shape) if s else None
        return {"sinks": sinks, "ring": kv_cache.init_ring(batch, min(cfg.window, max_len), *shape)}

    def _prefill(self, q, k, v, mask: Mask, state):
        sinks = state.data["sinks"]
        if sinks is not None:
            s = min(sinks.valid.shape[1], k.shape[1])
            kv = None if mask.kv_mask is None else mask.kv_mask[:, :s]
            sinks = kv_cache.write(sinks, k[:, :s], v[:, :s], 0, kv)
        ring = kv_cache.ring_fill(state.data["ring"], k, v, mask.kv_mask)
        return self.attend(q, k, v, mask), {"sinks": sinks, "ring": ring}

    def _step(self, q_t, k_t, v_t, state):
        p = state.position
        ring = kv_cache.ring_push(state.data["ring"], k_t, v_t, p)
        sinks = state.data["sinks"]
        s = 0 if sinks is None else sinks.valid.shape[1]
        # the window part leaves the sinks out (they are counted once, in their own slots)
        visible = ring.valid & ((ring.pos >= s) & (ring.pos > p - self.config.window))[None]
        k, v = ring.k, ring.v
        if sinks is not None:
            sinks = kv_cache.write(sinks, k_t[:, None], v_t[:, None], jnp.minimum(p, s - 1), enabled=p < s)
            visible = jnp.concatenate([sinks.valid & (jnp.arange(s) <= p)[None], visible], axis=1)
            k, v = jnp.concatenate([sinks.k, k], axis=1), jnp.concatenate([sinks.v, v], axis=1)
        out = kv_cache.attend_dense(q_t, k, v, visible[:, None])
        return out, {"sinks": sinks, "ring": ring}
