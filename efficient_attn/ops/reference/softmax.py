"""Dense softmax attention: the readable reference of ``ops.online_softmax`` and ``ops.block_sparse``.

Everything here forms the ``[B, H, T, S]`` logits and an explicit boolean visibility of the
same shape, then one masked softmax:

    s_ij = scale q_i . k_j                          (scale = 1 / sqrt(d) unless given)
    p_ij = exp(s_ij - lse_i) [j visible to i]
    lse_i = log sum_{j visible} exp(s_ij)           (-inf when nothing is visible)
    out_i = sum_j p_ij v_j                          (0 when nothing is visible, never NaN)

``softmax_attention`` takes a ``Mask`` (causal: key j <= query i; ``kv_mask`` [B, S];
``q_mask`` [B, T] (False rows are zero); ``dense`` [B|1, H|1, T, S]; segment ids: a query sees
only keys of its own segment); k and v may have fewer (kv) heads, read by query head h as
kv head h // (H / Hkv) (``repeat_kv``); ``softcap`` c puts c tanh(s / c) in place of s, and
``sinks`` [H] adds exp(sink_h) to every denominator of a row that sees a key; it is what ``variants/full.py`` computes and what the
online-softmax (blockwise) engine must equal, forward and backward.

``block_sparse_reference`` takes exactly the arguments of ``ops.block_sparse.block_sparse_attention``
(head-major q [B, H, T, D]) and builds the visibility that its block table and in-block masks
imply, pair by pair:

    listed:   key block j // block_k appears in row i // block_q of the table (-1 = no block),
              per head when the table is [H, nq, r]
    valid:    kv_valid[j]
    causal:   k_pos[j] <= q_pos[i]          (positions default to arange)
    segments: q_seg[i] == k_seg[j]
    band:     i - left <= j <= i + right    (row indices, not positions)
    self:     "exclude" hides k_pos[j] == q_pos[i]; "fallback" lowers that logit by
              ``SELF_PENALTY`` (so a query attends to itself only when alone)

k and v may have Hkv heads (query head h reads kv head h // (H / Hkv), by ``jnp.repeat``
here: a reference may repeat); ``softcap`` c puts c tanh(s / c) in place of s (before the
fallback penalty); ``sinks`` [H] is one more, value-less logit per head, visible to every row
that sees a key (it enters lse). It returns ``(out, lse)`` like the engine. O(T S) memory: small inputs only (tests, the
approximation experiment's ground truth). Computation is float32.

Non-finite inputs follow the rules of ``ops.masks``, written out: whether a row sees anything
is read from the visibility, never from its normaliser; keys no query may see (kv_valid
False) are zeroed with ``where`` before any product; ``weighted_values`` gives NaN to exactly
the rows that see a value with a NaN or Inf entry (no 0 * NaN anywhere else). A NaN in a
visible key reaches the rows that see it through their logits. Gradients are finite for
finite inputs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.core import Mask
from efficient_attn.ops.block_sparse import SELF_PENALTY

__all__ = [
    "masked_softmax_lse",
    "weighted_values",
    "visibility",
    "repeat_kv",
    "softmax_weights",
    "softmax_attention",
    "block_table_visibility",
    "block_sparse_reference",
]


def masked_softmax_lse(
    logits: Float[Array, "... S"], visible: Bool[Array, "... S"]
) -> tuple[Float[Array, "... S"], Float[Array, "..."]]:
    """Softmax over the last axis restricted to ``visible``, and its log-normaliser.

    A row with nothing visible gets all-zero weights and lse = -inf (no NaN, forward or
    backward); a row that sees something gets what the arithmetic gives (NaN if a visible
    logit is NaN). The row max is a constant of the softmax, so it is held out of the gradient.
    """
    visible = jnp.broadcast_to(visible, logits.shape)
    top = jnp.max(jnp.where(visible, logits, -jnp.inf), axis=-1, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    e = jnp.where(visible, jnp.exp(jnp.where(visible, logits - top, 0.0)), 0.0)
    den = jnp.sum(e, axis=-1, keepdims=True)
    seen = jnp.any(visible, axis=-1, keepdims=True)  # from the masks, not from den > 0
    weights = e / jnp.where(seen, den, 1.0)
    lse = jnp.where(seen, top + jnp.log(jnp.where(seen, den, 1.0)), -jnp.inf)
    return weights, lse[..., 0]


def weighted_values(
    weights: Float[Array, "B H T S"], visible: Bool[Array, "Bv Hv T S"], v: Float[Array, "B H S E"]
) -> Float[Array, "B H T E"]:
    """out_i = sum_j w_ij v_j (head-major). A value row with a NaN or Inf entry is left out of
    the product and makes every row that sees it all NaN; rows that do not see it are unchanged."""
    v = v.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(v), axis=-1)  # [B, H, S]
    out = jnp.einsum("bhts,bhse->bhte", weights, jnp.where(finite[..., None], v, 0.0))
    sees_bad = jnp.any(jnp.broadcast_to(visible, weights.shape) & ~finite[:, :, None, :], axis=-1)
    return jnp.where(sees_bad[..., None], jnp.nan, out)


def visibility(mask: Mask | None, B: int, T: int, S: int) -> Bool[Array, "B Hm T S"]:
    """The ``[B, 1|H, T, S]`` visibility a ``Mask`` describes (all True for ``None``).

    causal: j <= i; kv_mask: key j real; q_mask: query i real (a False row sees nothing, so
    its output is zero, as the ``Attention`` base class guarantees); dense: as given.
    """
    vis = jnp.ones((B, 1, T, S), bool)
    if mask is None:
        return vis
    if mask.causal:
        vis = vis & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])
    if mask.kv_mask is not None:
        vis = vis & jnp.asarray(mask.kv_mask, bool)[:, None, None, :]
    if mask.dense is not None:
        vis = vis & jnp.asarray(mask.dense, bool)
    if mask.q_mask is not None:  # a padded query sees nothing, so its output row is zero
        vis = vis & jnp.asarray(mask.q_mask, bool)[:, None, :, None]
    if mask.q_segment_ids is not None:  # packed sequences: only pairs of one segment
        qs, ks = jnp.asarray(mask.q_segment_ids), jnp.asarray(mask.kv_segment_ids)
        vis = vis & (qs[:, None, :, None] == ks[:, None, None, :])
    return jnp.broadcast_to(vis, (B,) + vis.shape[1:])


def repeat_kv(x: Float[Array, "B S Hkv E"], num_heads: int) -> Float[Array, "B S H E"]:
    """Grouped-query k or v as per-query-head arrays: head h is kv head h // (H / Hkv)."""
    return jnp.repeat(x, num_heads // x.shape[2], axis=2)


def softmax_weights(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S Hkv D"],
    mask: Mask | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: Float[Array, "H"] | None = None,
) -> Float[Array, "B H T S"]:
    """The attention matrix A of masked softmax attention (rows of zeros where nothing is visible).

    Grouped-query k (Hkv < H heads) is read by query head h as kv head h // (H / Hkv).
    ``softcap`` c: s -> c tanh(s / c) on the scaled logits (Gemma 2). ``sinks`` [H]: one more
    logit per head in every denominator, with no value (gpt-oss; rows then sum to < 1).
    """
    B, T, H, D = q.shape
    S = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = repeat_kv(k, H).astype(jnp.float32)
    if mask is not None and mask.kv_mask is not None:  # keys no query sees: out before any product
        k = jnp.where(jnp.asarray(mask.kv_mask, bool)[:, :, None, None], k, 0.0)
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    vis = visibility(mask, B, T, S)
    if sinks is None:
        weights, _ = masked_softmax_lse(logits, vis)
        return weights
    # the sink as an extra, always visible column: only a row that sees a key keeps it
    seen = jnp.any(jnp.broadcast_to(vis, logits.shape), axis=-1, keepdims=True)
    sink_col = jnp.broadcast_to(jnp.asarray(sinks, jnp.float32)[None, :, None, None], (B, H, T, 1))
    weights, _ = masked_softmax_lse(jnp.concatenate([logits, sink_col], -1),
                                    jnp.concatenate([jnp.broadcast_to(vis, logits.shape), seen], -1))
    return weights[..., :S]


def softmax_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S Hkv D"],
    v: Float[Array, "B S Hkv Dv"],
    mask: Mask | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: Float[Array, "H"] | None = None,
) -> Float[Array, "B T H Dv"]:
    """Masked softmax attention on BTHD arrays, float32: out = A V with A = ``softmax_weights``
    (grouped-query k, v, segments, soft cap and sinks as there)."""
    B, T, H, _ = q.shape
    weights = softmax_weights(q, k, mask, scale=scale, softcap=softcap, sinks=sinks)
    values = repeat_kv(v, H).transpose(0, 2, 1, 3)  # [B, H, S, Dv]
    return weighted_values(weights, visibility(mask, B, T, k.shape[1]), values).transpose(0, 2, 1, 3)


def _per_position(x, num_heads: int | None = None) -> Array:
    """[L], [B, L] or [B|1, H|1, L] -> an array broadcastable to [B, H, L] (the engine's rule).

    With ``num_heads``, a key-side array of Hkv < H heads is repeated per query head."""
    x = jnp.asarray(x)
    if x.ndim == 1:
        return x[None, None]
    if x.ndim == 2:
        return x[:, None]
    if num_heads is not None and x.shape[1] not in (1, num_heads):
        return jnp.repeat(x, num_heads // x.shape[1], axis=1)
    return x


def block_table_visibility(
    table,
    T: int,
    S: int,
    *,
    block_q: int,
    block_k: int,
    causal: bool = False,
    kv_valid: Bool[Array, "B Hk S"] | None = None,
    q_pos: Int[Array, "Bq Hq T"] | None = None,
    k_pos: Int[Array, "Bk Hk S"] | None = None,
    q_seg: Int[Array, "Bq Hq T"] | None = None,
    k_seg: Int[Array, "Bk Hk S"] | None = None,
    band: tuple[int, int] | None = None,
    self_mode: str | None = None,
    num_heads: int | None = None,
) -> Bool[Array, "Bv Hv T S"]:
    """The ``[B|1, H|1, T, S]`` pairs the block-sparse engine lets attend (module docstring).

    ``self_mode="fallback"`` changes a logit, not the visibility: it is applied by
    ``block_sparse_reference``, not here. ``num_heads``: key-side masks of fewer (kv) heads
    are repeated to it.
    """
    H = num_heads
    table = jnp.asarray(table, jnp.int32)
    if table.ndim == 2:
        table = table[None]  # one pattern for every head
    i, j = jnp.arange(T), jnp.arange(S)
    rows = table[:, i // block_q]  # [H|1, T, r]: the key blocks listed for query i's block
    listed = jnp.any(rows[:, :, None, :] == (j // block_k)[None, None, :, None], axis=-1)  # [H|1, T, S]
    vis = listed[None]  # [1, H|1, T, S]; the per-position masks below broadcast it to [B|1, H|1, T, S]
    if kv_valid is not None:
        vis = vis & _per_position(kv_valid, H)[..., None, :]
    if causal or self_mode == "exclude":
        qp = _per_position(i if q_pos is None else q_pos)[..., :, None]
        kp = _per_position(j if k_pos is None else k_pos, H)[..., None, :]
        if causal:
            vis = vis & (kp <= qp)
        if self_mode == "exclude":
            vis = vis & (kp != qp)
    if q_seg is not None:
        vis = vis & (_per_position(q_seg)[..., :, None] == _per_position(k_seg, H)[..., None, :])
    if band is not None:
        left, right = band
        vis = vis & (j[None, :] >= i[:, None] - left) & (j[None, :] <= i[:, None] + right)
    return vis


def block_sparse_reference(
    q: Float[Array, "B H T D"],
    k: Float[Array, "B Hkv S D"],
    v: Float[Array, "B Hkv S E"],
    table,
    *,
    block_q: int,
    block_k: int,
    causal: bool = False,
    kv_valid: Bool[Array, "B Hk S"] | None = None,
    q_pos: Int[Array, "Bq Hq T"] | None = None,
    k_pos: Int[Array, "Bk Hk S"] | None = None,
    q_seg: Int[Array, "Bq Hq T"] | None = None,
    k_seg: Int[Array, "Bk Hk S"] | None = None,
    band: tuple[int, int] | None = None,
    self_mode: str | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: Float[Array, "H"] | None = None,
) -> tuple[Float[Array, "B H T E"], Float[Array, "B H T"]]:
    """Dense attention over the block table: ``(out, lse)`` as ``block_sparse_attention`` returns."""
    B, H, T, D = q.shape
    S = k.shape[2]
    vis = block_table_visibility(
        table, T, S, block_q=block_q, block_k=block_k, causal=causal, kv_valid=kv_valid,
        q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg, band=band, self_mode=self_mode, num_heads=H,
    )
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = (jnp.repeat(x, H // x.shape[1], axis=1) for x in (k.astype(jnp.float32), v))  # kv head h // G
    if kv_valid is not None:  # keys no query sees: out before any product
        k = jnp.where(_per_position(kv_valid, H)[..., None], k, 0.0)
    logits = jnp.einsum("bhtd,bhsd->bhts", q.astype(jnp.float32), k) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    if self_mode == "fallback":
        qp = _per_position(jnp.arange(T) if q_pos is None else q_pos)[..., :, None]
        kp = _per_position(jnp.arange(S) if k_pos is None else k_pos, H)[..., None, :]
        logits = jnp.where(kp == qp, logits - SELF_PENALTY, logits)
    if sinks is None:
        weights, lse = masked_softmax_lse(logits, vis)
    else:  # the sink as an extra column, visible to the rows that see a key
        vis_full = jnp.broadcast_to(vis, logits.shape)
        seen = jnp.any(vis_full, axis=-1, keepdims=True)
        sink_col = jnp.broadcast_to(jnp.asarray(sinks, jnp.float32)[None, :, None, None], (B, H, T, 1))
        weights, lse = masked_softmax_lse(jnp.concatenate([logits, sink_col], -1),
                                          jnp.concatenate([vis_full, seen], -1))
        weights = weights[..., :S]
    return weighted_values(weights, vis, v), lse
