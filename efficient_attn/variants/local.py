"""``local``: sliding-window attention over a contiguous window.

Query ``i`` sees the keys within distance ``w`` (``window``) of it:

    bidirectional:  N(i) = { j : |i - j| <= w }          (up to 2w + 1 keys)
    causal:         N(i) = { j : i - w <= j <= i }        (up to w + 1 keys)
    out_i = sum_{j in N(i)} softmax_j(q_i . k_j / sqrt(d)) v_j      (kv_mask removes keys)

Native options (``Capabilities`` gqa, segments, softcap, sinks), all on the engine:
grouped-query k/v (query head h reads kv head h // G by index); packed sequences (N(i) keeps
only keys of i's segment, so a packed sequence gets exactly the window it would get alone);
``softcap`` c (s -> c tanh(s / c)); ``sinks`` (a learned value-less logit per head in every
denominator of a row that sees a key). Decoding refuses softcap and sinks.

Computed on the block-sparse engine (ops/block_sparse.py): blocks of ``b = clip(w, 16, 128)``
tokens (at most T), each query block gathers the ``2 ceil(w / b) + 1`` key blocks that overlap
its window (``ceil(w / b) + 1`` when causal) and a token-level band mask trims them to N(i).
Time O(N w d); no N x N matrix. The engine works through query blocks in runs of bounded
size, so memory is O(N d) plus one run (at least one block: O(w^2)). Exact (equal to ``full``) when ``w >= N - 1``.

Unlike Long Range Arena's "local attention", which reshaped the sequence by stride so that
a "block" held tokens far apart, the window here is contiguous, the same for every query.

Default ``window = 25``: LRA's local attention used blocks of 50 tokens (64 on images), so a
query saw about 50 keys; a bidirectional window of 25 on each side gives each query 51 keys,
the same budget, while keeping every query centred in its window.

Cites the local/"block" attention of Parmar et al., "Image Transformer", ICML 2018, and
Child et al. 2019 (section 4), as used in Tay et al., "Long Range Arena", ICLR 2021.
"""

from __future__ import annotations

import dataclasses

from jaxtyping import Array, Float

from efficient_attn.core import Attention, Capabilities, Mask, check_config, check_positive_int
from efficient_attn.ops import kv_cache
from efficient_attn.ops.block_sparse import band_block_size, banded_table, block_sparse_attention, num_blocks
from efficient_attn.ops.online_softmax import check_softcap
from efficient_attn.registry import Budget, register
from efficient_attn.variants.blockwise import sink_logits


@dataclasses.dataclass(frozen=True)
class LocalConfig:
    """window: how far (in tokens) a query looks on each side (only backwards when causal);
    softcap: None or c > 0 (logits s -> c tanh(s / c)); sinks: a learned per-head sink logit."""

    window: int = 25
    softcap: float | None = None
    sinks: bool = False

    def __post_init__(self):
        check_positive_int("local", "window", self.window)
        check_softcap("local", self.softcap)
        check_config("local", isinstance(self.sinks, bool), f"sinks must be True or False, got {self.sinks!r}")


def sliding_window_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv Dv"],
    window: int,
    mask: Mask,
    *,
    softcap: float | None = None,
    sinks: Float[Array, "H"] | None = None,
) -> Float[Array, "B T H Dv"]:
    """Sliding-window attention on BTHD arrays (float32 result); k, v may have Hkv heads."""
    B, T, H, D = q.shape
    causal, kv = mask.causal, mask.kv_mask
    b = band_block_size(window, T)
    nb = num_blocks(T, b)
    right = 0 if causal else window
    table = banded_table(nb, nb, b, b, window, right)
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    out, _ = block_sparse_attention(
        qh, kh, vh, table, block_q=b, block_k=b, causal=causal, kv_valid=kv, band=(window, right),
        q_seg=mask.q_segment_ids, k_seg=mask.kv_segment_ids, softcap=softcap, sinks=sinks,
    )
    return out.transpose(0, 2, 1, 3)


@register(
    "local",
    config=LocalConfig,
    family="local",
    citation="Parmar et al. 2018, Image Transformer; Tay et al. 2021, Long Range Arena",
    budget=Budget("window", (4, 8, 16, 32, 64, 128, 256), length_like=True),  # keys on each side
    pattern_setting={"window": 8},
    exact_limit=lambda n: {"window": n},
)
class LocalAttention(Attention):
    """Sliding-window attention: each query sees the keys within `window` tokens of it."""

    capabilities = Capabilities(
        causal=True, cross=False, kv_mask=True, exact=False, time="O(N w)", memory="O(N + w^2)",
        gqa=True, segments=True, softcap=True, sinks=True, decode=True,
    )

    def __init__(self, config: LocalConfig, dims, *, rngs):
        super().__init__(config, dims, rngs=rngs)
        self.sinks = sink_logits(dims.num_heads, config.sinks)

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S Hkv D"],
        v: Float[Array, "B S Hkv Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        sinks = None if self.sinks is None else self.sinks[...]
        return sliding_window_attention(q, k, v, self.config.window, mask, softcap=self.config.softcap, sinks=sinks)

    # decoding: a ring buffer of window + 1 slots (the keys i - w .. i), whatever the context

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        if self.config.softcap is not None or self.config.sinks:
            raise ValueError("local: decoding with softcap or sinks is not implemented; build without them to decode")
        d = self.dims
        slots = min(self.config.window + 1, max_len)
        return kv_cache.init_ring(batch, slots, d.num_kv_heads, d.head_dim, d.head_dim, dtype)

    def _prefill(self, q, k, v, mask: Mask, state):
        return self.attend(q, k, v, mask), kv_cache.ring_fill(state.data, k, v, mask.kv_mask)

    def _step(self, q_t, k_t, v_t, state):
        ring = kv_cache.ring_push(state.data, k_t, v_t, state.position)
        visible = ring.valid & ((ring.pos >= 0) & (ring.pos >= state.position - self.config.window))[None]
        return kv_cache.attend_dense(q_t, ring.k, ring.v, visible[:, None]), ring
