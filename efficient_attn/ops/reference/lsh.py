"""Dense LSH attention: the readable reference of Reformer's engine (``variants/lsh.py``).

Kitaev, Kaiser and Levskaya 2020, "Reformer: The Efficient Transformer", section 2. The
engine sorts tokens by hash bucket and attends within chunks of the sorted order; here the
[T, T] matrix of who-sees-whom is written out pair by pair, in original positions, and one
masked softmax is taken. Nothing is sorted, nothing is chunked in memory.

Shared QK: keys are the normalised queries, k_j = q_j / max(|q_j|, 1e-6); logits
s_ij = q_i . k_j / sqrt(d).

One hash round r (rotations R_r [H, d, n_b / 2], the module's fixed ``LSHRotations``, passed
in): bucket h(x) = argmax([x R_r ; -x R_r]) over n_b = 2 ceil(T / (2 m)) buckets (1 when
T <= m), m = min(bucket_size, T). A token's rank in the order "by bucket, then position" is

    rank_i = #{j : h_j < h_i} + #{j < i : h_j = h_i}

and the pairs the engine lets attend in that round are

    bidirectional:  rank_j // m  in  {rank_i // m, rank_i // m - 1}   (own chunk, previous one)
    causal:         h_j = h_i  and  j <= i  and  rank_i - rank_j <= m
                    (the most recent m earlier tokens of its own bucket, and itself)

each AND kv_mask[j]. Rounds: with c_ij the number of rounds in which j is visible to i, the
engine's logsumexp merge of the rounds is one softmax with weights proportional to
c_ij exp(s_ij) (a key seen in two rounds counts twice, as in trax). Self: a token attends to
itself only when it sees no other key in any round (the engine lowers its own logit by 1e5;
in float32 that weight is exactly 0 next to any other key):

    visible_ij = c_ij > 0  and  (j != i  or  no j' != i has c_ij' > 0)
    out_i      = sum_j softmax_j(s_ij + log c_ij over visible_ij) v_j

``shared_qk_weights`` / ``shared_qk_attention`` are the same with every pair in every round
visible (full attention of the shared-QK model): the ground truth an LSH approximation is
measured against.
O(n T^2) memory: small inputs only. Float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.core import Mask
from efficient_attn.ops.reference.softmax import masked_softmax_lse, visibility, weighted_values

__all__ = [
    "num_buckets",
    "angular_buckets",
    "sorted_rank",
    "round_visibility",
    "shared_qk_keys",
    "not_self_unless_alone",
    "lsh_weights",
    "lsh_attention_reference",
    "shared_qk_weights",
    "shared_qk_attention",
]


def num_buckets(length: int, bucket_size: int) -> int:
    """n_b = 2 ceil(T / (2 m)), or 1 when one chunk of m holds the whole sequence."""
    return 1 if length <= bucket_size else 2 * math.ceil(length / (2 * bucket_size))


def angular_buckets(
    x: Float[Array, "B H T D"], rotations: Float[Array, "n H D K"], n_buckets: int
) -> Int[Array, "n B H T"]:
    """h(x) = argmax([x R ; -x R]) per round, with R = rotations[..., : n_buckets // 2]."""
    n, (B, H, T) = rotations.shape[0], x.shape[:3]
    if n_buckets == 1:
        return jnp.zeros((n, B, H, T), jnp.int32)
    rot = jnp.einsum("bhtd,nhdk->nbhtk", x.astype(jnp.float32), rotations[..., : n_buckets // 2].astype(jnp.float32))
    return jnp.argmax(jnp.concatenate([rot, -rot], axis=-1), axis=-1).astype(jnp.int32)


def sorted_rank(buckets: Int[Array, "... T"]) -> Int[Array, "... T"]:
    """Each token's place in the order by (bucket, position), counted pairwise (no sort)."""
    T = buckets.shape[-1]
    bi, bj = buckets[..., :, None], buckets[..., None, :]
    earlier = jnp.arange(T)[None, :] < jnp.arange(T)[:, None]  # [i, j]: j < i
    before = (bj < bi) | ((bj == bi) & earlier)
    return jnp.sum(before, axis=-1)


def round_visibility(buckets: Int[Array, "... T"], bucket_size: int, causal: bool) -> Bool[Array, "... T T"]:
    """[..., i, j]: the engine lets query i see key j in this round (before kv_mask and the self rule)."""
    T = buckets.shape[-1]
    m = min(bucket_size, T)
    rank = sorted_rank(buckets)
    ri, rj = rank[..., :, None], rank[..., None, :]
    if causal:
        i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
        same = buckets[..., :, None] == buckets[..., None, :]
        return same & (j <= i) & (ri - rj <= m)
    ci, cj = ri // m, rj // m
    return (cj == ci) | (cj == ci - 1)


def shared_qk_keys(q: Float[Array, "B T H D"]) -> Float[Array, "B T H D"]:
    """k_j = q_j / max(|q_j|, 1e-6)."""
    q = q.astype(jnp.float32)
    return q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-6)


def not_self_unless_alone(visible: Bool[Array, "... T T"]) -> Bool[Array, "... T T"]:
    """Drop the diagonal from every row that sees some other key; keep it where it is all the row has."""
    T = visible.shape[-1]
    other = ~jnp.eye(T, dtype=bool)
    alone = ~jnp.any(visible & other, axis=-1, keepdims=True)
    return visible & (other | alone)


def lsh_weights(
    q: Float[Array, "B T H D"],
    rotations: Float[Array, "n H D K"],
    bucket_size: int,
    *,
    causal: bool = False,
    kv_mask: Bool[Array, "B T"] | None = None,
    buckets: Int[Array, "n B H T"] | None = None,
) -> Float[Array, "B H T T"]:
    """The [T, T] attention matrix of LSH attention, every round merged (module docstring).

    ``buckets`` defaults to the single angular hash of ``angular_buckets``; above 64 buckets
    reformer factorises its hash (variants/lsh.py), and a caller passes those buckets here."""
    return _lsh_softmax(q, rotations, bucket_size, causal, kv_mask, buckets)[0]


def _lsh_softmax(q, rotations, bucket_size: int, causal: bool, kv_mask, buckets):
    """(weights [B, H, T, T], visibility [B, H, T, T]) of ``lsh_weights``."""
    B, T, H, D = q.shape
    x = q.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, H, T, D]
    if buckets is None:
        buckets = angular_buckets(lax.stop_gradient(x), rotations, num_buckets(T, bucket_size))  # [n, B, H, T]
    per_round = round_visibility(buckets, bucket_size, causal)  # [n, B, H, T, T]
    if kv_mask is not None:
        per_round = per_round & kv_mask[None, :, None, None, :]
    count = jnp.sum(per_round, axis=0)  # c_ij
    vis = not_self_unless_alone(count > 0)
    k = shared_qk_keys(q).transpose(0, 2, 1, 3)
    logits = jnp.einsum("bhtd,bhsd->bhts", x, k) / math.sqrt(D)
    logits = logits + jnp.log(jnp.maximum(count, 1).astype(jnp.float32))
    weights, _ = masked_softmax_lse(logits, vis)
    return weights, vis


def lsh_attention_reference(
    q: Float[Array, "B T H D"],
    v: Float[Array, "B T H Dv"],
    rotations: Float[Array, "n H D K"],
    bucket_size: int,
    *,
    causal: bool = False,
    kv_mask: Bool[Array, "B T"] | None = None,
    buckets: Int[Array, "n B H T"] | None = None,
) -> Float[Array, "B T H Dv"]:
    """Reformer's output, densely: ``lsh_weights`` applied to v (k is not an input: shared QK)."""
    weights, vis = _lsh_softmax(q, rotations, bucket_size, causal, kv_mask, buckets)
    return weighted_values(weights, vis, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


def shared_qk_weights(q: Float[Array, "B T H D"], mask: Mask | None = None) -> Float[Array, "B H T T"]:
    """The attention matrix of full attention in the shared-QK model: keys q / |q|, not self
    unless alone, the mask's causal, kv_mask and q_mask (dense entries too, if any).
    What LSH attention approximates."""
    return _shared_qk_softmax(q, mask)[0]


def _shared_qk_softmax(q, mask):
    B, T, H, D = q.shape
    vis = not_self_unless_alone(visibility(mask, B, T, T))
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), shared_qk_keys(q)) / math.sqrt(D)
    weights, _ = masked_softmax_lse(logits, vis)
    return weights, vis


def shared_qk_attention(
    q: Float[Array, "B T H D"], v: Float[Array, "B T H Dv"], mask: Mask | None = None
) -> Float[Array, "B T H Dv"]:
    """``shared_qk_weights`` applied to v."""
    weights, vis = _shared_qk_softmax(q, mask)
    return weighted_values(weights, vis, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
