"""``full``: softmax attention written out with einsums; the ground truth of every exact path.

    s_ij = q_i . k_j / sqrt(d)                      (query head h reads kv head h // G)
    s_ij <- c tanh(s_ij / c)                        (``softcap`` c, Gemma 2; before masking)
    A_ij = exp(s_ij) [j visible to i] / (sum_{j' visible} exp(s_ij') + exp(sink_h))
    out_i = sum_j A_ij v_j

Time O(T S d), memory O(T S): the [B, H, T, S] score matrix is materialised on purpose,
because this is the readable reference every other variant is tested against.

Native options (``Capabilities`` gqa, segments, softcap, sinks):

- grouped-query attention: k, v have Hkv = H / G heads; q is viewed as [B, T, Hkv, G, D]
  and the einsums run over that grouping, so k and v are read by index, never repeated;
- packed sequences: ``Mask.q_segment_ids`` / ``kv_segment_ids``, a query sees only the keys
  of its own segment (and, causal, only earlier ones);
- ``softcap``: the logit soft cap above;
- ``sinks``: a learned logit per query head (``nnx.Param``, zeros at start) that joins the
  denominator of every row that sees a key and carries no value (StreamingLLM's sink,
  gpt-oss's ``softmax_aux``): rows then sum to less than 1. A row that sees no key stays 0.

Non-finite inputs follow ``ops.masks``' rules, and this file defines them for every exact
path: keys no query can see are zeroed before any product, a value row with a NaN or Inf
entry makes the logits of its key NaN (so exactly the queries that see it are NaN, in every
component), and a query that sees no key is zero.

Decoding (a KV cache of max_len slots, one masked softmax over it per step) reads grouped
kv heads by index; it does not implement softcap or sinks and refuses them.
Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from efficient_attn.core import Attention, Capabilities, Mask, check_config
from efficient_attn.ops import kv_cache
from efficient_attn.ops.masks import dense_visibility, masked_softmax, split_nonfinite
from efficient_attn.ops.online_softmax import check_softcap
from efficient_attn.registry import register
from efficient_attn.variants.blockwise import sink_logits


@dataclasses.dataclass(frozen=True)
class FullConfig:
    """softcap: None or c > 0 (logits s -> c tanh(s / c)); sinks: a learned per-head sink logit."""

    softcap: float | None = None
    sinks: bool = False

    def __post_init__(self):
        check_softcap("full", self.softcap)
        check_config("full", isinstance(self.sinks, bool), f"sinks must be True or False, got {self.sinks!r}")


def softmax_with_sinks(
    logits: Float[Array, "B H T S"], visible: Bool[Array, "B Hm T S"] | None, sinks: Float[Array, "H"] | None
) -> Float[Array, "B H T S"]:
    """``masked_softmax`` with one more, value-less logit per head in each denominator.

    The sink is an extra column, visible exactly to the rows that see some key, so a row
    that sees nothing keeps its zeros."""
    if sinks is None:
        return masked_softmax(logits, visible)
    B, H, T, S = logits.shape
    visible = jnp.ones((1, 1, 1, 1), bool) if visible is None else visible
    visible = jnp.broadcast_to(visible, logits.shape)
    sink_column = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None], (B, H, T, 1))
    seen = jnp.any(visible, axis=-1, keepdims=True)
    weights = masked_softmax(jnp.concatenate([logits, sink_column], -1), jnp.concatenate([visible, seen], -1))
    return weights[..., :S]


def full_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S Hkv D"],
    v: Float[Array, "B S Hkv Dv"],
    mask: Mask | None = None,
    *,
    softcap: float | None = None,
    sinks: Float[Array, "H"] | None = None,
) -> Float[Array, "B T H Dv"]:
    """Reference softmax attention on BTHD arrays, computed in float32 (module docstring).

    k and v may have Hkv heads dividing H (query head h reads kv head h // (H / Hkv)).
    """
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    qf = q.astype(jnp.float32).reshape(B, T, Hkv, G, D)  # query head h = (kv head h // G, member h % G)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    visible = dense_visibility(mask, B, T, S)  # [B, 1|H, T, S] or None
    if visible is not None:  # a key no query of its group sees is read by no product, forward or backward
        visible = jnp.broadcast_to(visible, (B, visible.shape[1], T, S))  # a kv_mask alone is [B, 1, 1, S]
        grouped = visible.reshape(B, Hkv, G, T, S) if visible.shape[1] == H else visible[:, :, None]
        used = jnp.broadcast_to(jnp.any(grouped, axis=(2, 3)), (B, Hkv, S)).transpose(0, 2, 1)[..., None]
        kf, vf = jnp.where(used, kf, 0.0), jnp.where(used, vf, 0.0)
    vf, bad = split_nonfinite(vf)  # bad [B, S, Hkv]
    logits = jnp.einsum("btkgd,bskd->bkgts", qf, kf) / jnp.sqrt(jnp.float32(D))
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(bad.transpose(0, 2, 1)[:, :, None, None, :], jnp.nan, logits)  # who sees a bad value is NaN
    weights = softmax_with_sinks(logits.reshape(B, H, T, S), visible, sinks)
    out = jnp.einsum("bkgts,bskd->btkgd", weights.reshape(B, Hkv, G, T, S), vf)
    return out.reshape(B, T, H, v.shape[-1])


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
        causal=True, cross=True, kv_mask=True, dense_mask=True, exact=True, time="O(N^2)", memory="O(N^2)",
        gqa=True, segments=True, softcap=True, sinks=True, decode=True,
    )

    def __init__(self, config: FullConfig, dims, *, rngs):
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
        return full_attention(q, k, v, mask, softcap=self.config.softcap, sinks=sinks)

    # decoding: a KV cache of max_len slots, one masked softmax over it per step (O(p d))

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        d = self.dims
        return kv_cache.init_softmax_cache(self.variant_name, batch, max_len, d.num_kv_heads, d.head_dim, dtype,
                                           softcap=getattr(self.config, "softcap", None),
                                           sinks=getattr(self.config, "sinks", False))

    def _prefill(self, q, k, v, mask: Mask, state):
        return self.attend(q, k, v, mask), kv_cache.write(state.data, k, v, 0, mask.kv_mask)

    def _step(self, q_t, k_t, v_t, state):
        cache = kv_cache.write(state.data, k_t[:, None], v_t[:, None], state.position)
        visible = kv_cache.causal_visible(cache, state.position)
        return kv_cache.attend_dense(q_t, cache.k, cache.v, visible), cache
