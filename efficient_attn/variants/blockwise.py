"""``blockwise``: exact softmax attention by an online softmax over key blocks, O(N) memory.

The same function as "full", computed block by block so that no T x S matrix exists in the
forward or the backward pass (a ``jax.custom_vjp`` recomputes block scores). The engine and
its math are in ``efficient_attn.ops.online_softmax``. Time O(N^2 d), memory O(N d).
Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory"; Dao et al. 2022,
"FlashAttention".
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from efficient_attn.core import Attention, Capabilities, Mask, check_positive_int
from efficient_attn.ops import kv_cache
from efficient_attn.ops.online_softmax import blockwise_attention, check_softcap
from efficient_attn.registry import register


@dataclasses.dataclass(frozen=True)
class BlockwiseConfig:
    """block_size: query and key rows per forward block and key rows per backward block;
    backward_query_block: query rows per backward block. Both are clipped to the sequence
    length and balanced (``ops.online_softmax.balanced_block``).

    1024 / 256 measured fastest on a 2-core CPU at N = 4096 (see experiments/bench_exact.py
    and the engine's docstring).
    """

    block_size: int = 1024
    backward_query_block: int = 256
    softcap: float | None = None
    sinks: bool = False

    def __post_init__(self):
        check_positive_int("blockwise", "block_size", self.block_size)
        check_positive_int("blockwise", "backward_query_block", self.backward_query_block)
        check_softcap("blockwise", self.softcap)


def sink_logits(num_heads: int, enabled: bool):
    """The learned per-head sink logits (zeros at start: each adds e^0 to every denominator), or None."""
    return nnx.Param(jnp.zeros((num_heads,), jnp.float32)) if enabled else None


@register(
    "blockwise",
    config=BlockwiseConfig,
    family="exact",
    citation="Rabe & Staats 2021; Dao et al. 2022 (FlashAttention)",
)
class BlockwiseAttention(Attention):
    """Exact softmax attention, online softmax over key blocks, recomputing backward: O(N) memory.

    Grouped-query k/v, packed segments, ``softcap`` and ``sinks`` are native in the engine."""

    capabilities = Capabilities(
        causal=True, cross=True, kv_mask=True, dense_mask=False, exact=True, time="O(N^2)", memory="O(N)",
        gqa=True, segments=True, softcap=True, sinks=True, decode=True
    )

    def __init__(self, config, dims, *, rngs):
        super().__init__(config, dims, rngs=rngs)
        self.sinks = sink_logits(dims.num_heads, config.sinks)

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        return blockwise_attention(
            q, k, v, causal=mask.causal, kv_mask=mask.kv_mask, q_segment_ids=mask.q_segment_ids,
            kv_segment_ids=mask.kv_segment_ids, softcap=self.config.softcap,
            sinks=None if self.sinks is None else self.sinks[...], block_size=self.config.block_size,
            backward_query_block=self.config.backward_query_block,
        )

    # decoding: a KV cache of max_len slots read by an online softmax over blocks of
    # ``block_size`` slots; blocks past the position are skipped, so a step reads O(p) slots

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        d = self.dims
        return kv_cache.init_softmax_cache(self.variant_name, batch, max_len, d.num_kv_heads, d.head_dim, dtype,
                                           softcap=getattr(self.config, "softcap", None),
                                           sinks=getattr(self.config, "sinks", False))

    def _prefill(self, q, k, v, mask: Mask, state):
        return self.attend(q, k, v, mask), kv_cache.write(state.data, k, v, 0, mask.kv_mask)

    def _step(self, q_t, k_t, v_t, state):
        cache = kv_cache.write(state.data, k_t[:, None], v_t[:, None], state.position)
        return kv_cache.attend_blocks(q_t, cache, state.position, block=self.config.block_size), cache
