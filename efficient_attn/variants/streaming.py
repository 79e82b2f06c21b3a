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
    out, _ = merge_softmax(jnp.stack([out, out_s]), jnp.stack([lse, lse_s]))
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
        causal=True, cross=False, kv_mask=True, exact=False, time="O(N (w + s))", memory="O(N + w^2)"
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
