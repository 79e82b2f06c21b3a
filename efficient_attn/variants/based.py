"""``based``: exact softmax over a short sliding window, Taylor linear attention beyond it.

Based (Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff", ICML). Its linear attention projects queries and keys to a
small feature dimension d' (16) and applies the 2nd-order Taylor feature map of exp,

    phi(x) = [1, x / d'^(1/4), (x (x) x) / (sqrt(2) sqrt(d'))]         (1 + d' + d'^2 features)
    phi(q~) . phi(k~) = 1 + s + s^2 / 2,     s = q~ . k~ / sqrt(d')    (~ exp(s) near s = 0)

and pairs it with exact sliding-window softmax attention over a short window (64): the
window gives precise local token shifts and comparisons, the linear part a fixed-size state
over the whole past.

Our interface hands the variant per-head q, k [B, T, H, d], already projected by the model,
so the projections to d' live here: learned ``nnx.Param`` ``q_proj``, ``k_proj`` [H, d, d'],
q~ = q W_q, k~ = k W_k (trained separately, as Based's two projections are). Both start
from one Gaussian draw W with variance 1 / sqrt(d' d) per entry, so E[W W^T] = sqrt(d'/d) I
and E[q~ . k~ / sqrt(d')] = q . k / sqrt(d): the linear part starts as a random-projection
estimate of the softmax logit it stands in for (independent draws would start it at 0).

One call, two parts, one normaliser. The Based *model* interleaves linear-attention layers
with sliding-window layers (and short convolutions); a single attention call here must return
one output, so the two parts share one softmax-style normaliser (as LoLCATs, Zhang et al.
2024, combine a window with linear attention): with W(i) the w = ``window`` nearest keys
(causal: i - w < j <= i; bidirectional: |i - j| < w) and L(i) the visible keys outside it,

    out_i = ( sum_{j in W(i)} exp(q_i . k_j / sqrt(d)) v_j + sum_{j in L(i)} phi(q~_i) . phi(k~_j) v_j )
            / ( sum_{j in W(i)} exp(q_i . k_j / sqrt(d))     + sum_{j in L(i)} phi(q~_i) . phi(k~_j) )

Why this rather than adding two separately normalised outputs: the output stays a convex
combination of values, as softmax attention's is, so the two parts compete for weight the
way softmax keys do (the Taylor kernel is the 2nd-order approximation of exp, so both weigh
on the same scale); and no key counts twice, so a window covering the sequence is exactly
softmax attention (the exact limit the approximation experiment's window sweep ends on).
A sum of two outputs would have neither property.

Computation, all O(N): the window part on the block-sparse engine (banded table, as
``local``), returning its output and log-normaliser lse; the part before the window,
j <= i - w, on the linear-attention engine with the key sequence shifted by w (query i
causally sees shifted position i, i.e. original key i - w); bidirectional adds the part after
the window by the same computation on the time-reversed sequence. Each linear part's
denominator phi(q~_i) . sum_j phi(k~_j) comes from a prefix sum of the key features; the
parts are merged by logsumexp weighting (``merge_softmax``: exp(lse) and den are the two
normalisers). No N x N array; time O(N (w d + d'^2 d)), memory O(N d'^2).

Masks: kv_mask removes keys from both parts (masked keys and values are zeroed before any
product, so NaN or inf there never reach an output or gradient); a query that sees no key
gets zeros. Cross attention (T != S) is refused: the window needs aligned positions.

What the experiments need to know. Budget: ``window`` (exact softmax keys per query; the
linear part covers the rest). Exact limit: window >= N. Defaults: d' = 16 and window 64, the
paper's sizes. Unlike ``linear``/``performer`` this variant has learned parameters.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from efficient_attn.core import Attention, Capabilities, Dims, Mask, check_positive_int
from efficient_attn.ops import kv_cache, linear_state, masks
from efficient_attn.ops.block_sparse import (
    band_block_size,
    banded_table,
    block_sparse_attention,
    merge_softmax,
    num_blocks,
)
from efficient_attn.ops.linear_attention import linear_attention
from efficient_attn.registry import Budget, register

__all__ = ["BasedConfig", "Based", "taylor_features", "based_features", "based_attention"]


@dataclasses.dataclass(frozen=True)
class BasedConfig:
    """feature_dim: d' of the Taylor map's input; window: exact softmax keys per query;
    chunk_size: causal chunk length of the linear-attention engine."""

    feature_dim: int = 16
    window: int = 64
    chunk_size: int = 64

    def __post_init__(self):
        check_positive_int("based", "feature_dim", self.feature_dim)
        check_positive_int("based", "window", self.window)
        check_positive_int("based", "chunk_size", self.chunk_size)


def taylor_features(x: Float[Array, "... F"]) -> Float[Array, "... G"]:
    """[1, x, (x (x) x) / sqrt(2)]: phi(a) . phi(b) = 1 + a . b + (a . b)^2 / 2 (G = 1 + F + F^2)."""
    outer = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (-1,)) / math.sqrt(2.0)
    return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), x.dtype), x, outer], axis=-1)


def based_features(x: Float[Array, "B T H D"], proj: Float[Array, "H D F"]) -> Float[Array, "B T H G"]:
    """phi(x W / d'^(1/4)): the paper's scaling, so phi(q~) . phi(k~) = 1 + s + s^2/2, s = q~.k~/sqrt(d')."""
    F = proj.shape[-1]
    return taylor_features(jnp.einsum("bthd,hdf->bthf", x, proj) * F**-0.25)


def _shift(x, offset: int):
    """x[:, t - offset] at t >= offset, zeros (False) before: [B, T, ...] -> [B, T, ...]."""
    T = x.shape[1]
    widths = [(0, 0), (offset, 0)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths)[:, :T]


def _linear_before(phi_q, phi_k, v, real, offset: int, chunk: int):
    """Linear attention of query i over keys j <= i - offset: (out [B, T, H, E], log den [B, T, H])."""
    keep = _shift(real, offset)
    phi_k = jnp.where(keep[:, :, None, None], _shift(phi_k, offset), 0.0)
    v = _shift(v, offset)
    out, den = linear_attention(phi_q, phi_k, v, causal=True, kv_mask=keep, eps=0.0, chunk_size=chunk,
                                return_denominator=True)
    pos = den > 0
    return out, jnp.where(pos, jnp.log(jnp.where(pos, den, 1.0)), -jnp.inf)


def based_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T H D"],
    v: Float[Array, "B T H Dv"],
    q_proj: Float[Array, "H D F"],
    k_proj: Float[Array, "H D F"],
    *,
    window: int,
    causal: bool,
    kv_mask: Bool[Array, "B T"] | None = None,
    chunk_size: int = 64,
) -> Float[Array, "B T H Dv"]:
    """Window softmax + Taylor linear attention outside it, one normaliser (float32 result)."""
    B, T, H, D = q.shape
    real = jnp.ones((B, T), bool) if kv_mask is None else kv_mask
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    k, v = (jnp.where(real[:, :, None, None], x, 0.0) for x in (k, v))

    left = window - 1
    right = 0 if causal else window - 1
    b = band_block_size(left, T)
    nb = num_blocks(T, b)
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    out_w, lse_w = block_sparse_attention(
        qh, kh, vh, banded_table(nb, nb, b, b, left, right), block_q=b, block_k=b,
        causal=causal, kv_valid=real, band=(left, right),
    )
    outs, lses = [out_w.transpose(0, 2, 1, 3)], [lse_w.transpose(0, 2, 1)]
    if window < T:  # some keys lie outside the window
        phi_q = based_features(q, q_proj.astype(jnp.float32))
        phi_k = based_features(k, k_proj.astype(jnp.float32))
        out, lse = _linear_before(phi_q, phi_k, v, real, window, chunk_size)
        outs.append(out)
        lses.append(lse)
        if not causal:  # keys after the window: the same on the reversed sequence
            flip = lambda x: jnp.flip(x, axis=1)  # noqa: E731
            out, lse = _linear_before(flip(phi_q), flip(phi_k), flip(v), flip(real), window, chunk_size)
            outs.append(flip(out))
            lses.append(flip(lse))
    out, _ = merge_softmax(outs, lses)
    return out


@register(
    "based",
    config=BasedConfig,
    family="based",
    citation="Arora et al. 2024, Simple linear attention language models balance the recall-throughput tradeoff",
    budget=Budget("window", (4, 8, 16, 32, 64, 128, 256), length_like=True),
    pattern_setting={"window": 8},
    exact_limit=lambda n: {"window": n},
)
class Based(Attention):
    """Based: exact sliding-window softmax plus 2nd-order Taylor linear attention outside the window."""

    capabilities = Capabilities(
        causal=True, cross=False, kv_mask=True, exact=False, time="O(N (w d + d'^2 d))", memory="O(N d'^2)", decode=True
    )

    def __init__(self, config: BasedConfig, dims: Dims, *, rngs: nnx.Rngs):
        super().__init__(config, dims, rngs=rngs)
        shape = (dims.num_heads, dims.head_dim, config.feature_dim)
        std = (config.feature_dim * dims.head_dim) ** -0.25  # E[q~ . k~ / sqrt(d')] = q . k / sqrt(d)
        w = std * jax.random.normal(rngs.params(), shape, jnp.float32)
        self.q_proj = nnx.Param(w)
        self.k_proj = nnx.Param(w)

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        cfg = self.config
        return based_attention(
            q, k, v, self.q_proj[...], self.k_proj[...], window=cfg.window, causal=mask.causal,
            kv_mask=mask.kv_mask, chunk_size=cfg.chunk_size,
        )

    # decoding: the window in a ring buffer of w slots, and the Taylor sums of every key that
    # has left it (a key joins the sums at the step that evicts it from the ring): memory
    # O(w d + d'^2 d) per head, independent of the context; one normaliser, as in ``attend``

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        d, cfg = self.dims, self.config
        features = 1 + cfg.feature_dim + cfg.feature_dim**2
        ring = kv_cache.init_ring(batch, min(cfg.window, max_len), d.num_heads, d.head_dim, d.head_dim, dtype)
        return {"ring": ring, "sums": linear_state.init_state(batch, d.num_heads, features, d.head_dim)}

    def _taylor(self, x, proj):
        return based_features(x.astype(jnp.float32), proj[...].astype(jnp.float32))

    def _prefill(self, q, k, v, mask: Mask, state):
        T = k.shape[1]
        real = jnp.ones(k.shape[:2], bool) if mask.kv_mask is None else mask.kv_mask
        phi_k = self._taylor(masks.hide_keys(k, real), self.k_proj)
        before = real & (jnp.arange(T) <= T - 1 - self.config.window)[None]  # already out of the next window
        sums = linear_state.summarise(phi_k, v, kv_mask=before)
        ring = kv_cache.ring_fill(state.data["ring"], k, v, mask.kv_mask)
        return self.attend(q, k, v, mask), {"ring": ring, "sums": sums}

    def _step(self, q_t, k_t, v_t, state):
        p, w = state.position, self.config.window
        ring, sums = state.data["ring"], state.data["sums"]
        k_old, v_old, live, held = kv_cache.ring_slot(ring, p)
        leaving = live & (held <= p - w)  # the key this push evicts leaves the window now
        sums = linear_state.write(sums, self._taylor(k_old[:, None], self.k_proj)[:, 0], v_old, keep_t=leaving)
        ring = kv_cache.ring_push(ring, k_t, v_t, p)
        visible = ring.valid & ((ring.pos >= 0) & (ring.pos > p - w))[None]
        out_w, lse_w = kv_cache.attend_dense_lse(q_t, ring.k, ring.v, visible[:, None])
        num, den = linear_state.read(sums, self._taylor(q_t[:, None], self.q_proj)[:, 0])
        den = den[..., 0]  # no log scales here: the sums are at scale 1 once a key is in
        pos = den > 0
        out_l = jnp.where(pos[..., None], num / jnp.where(pos, den, 1.0)[..., None], 0.0)
        lse_l = jnp.where(pos, jnp.log(jnp.where(pos, den, 1.0)), -jnp.inf)
        out, _ = merge_softmax([out_w, out_l], [lse_w, lse_l])
        return out, {"ring": ring, "sums": sums}
