"""MoBA's block selection written densely: the readable reference of ``variants/selection.py``.

Every step is the definition, with the whole ``[B, H, T, S]`` picture in memory (slow and
quadratic on purpose):

1. keys are cut into blocks of ``block_size`` consecutive positions; block J's gate key is
   the mean of its real keys (``kv_mask`` True), and a block without one has none;
2. query i scores every block, ``s_iJ = q_i . mean(K_J)``; a block without a real key scores
   -inf; causal: blocks after query i's own block I score -inf and block I scores +inf when
   it has a real key (always chosen);
3. block J is selected for query i when its score is > -inf and fewer than ``top_k`` blocks
   rank above it (higher score, or an equal score at a lower index: the order
   ``jax.lax.top_k`` uses), i.e. the top-k written as a rank instead of a sort;
4. key j is visible to query i when its block is selected, it is real and (causal) j <= i;
   a dense masked softmax over the visible keys gives the output (zeros where none is).

The selection carries no gradient (it is a choice); gradients flow through the softmax over
the selected keys only, as in MoBA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from efficient_attn.ops.masks import masked_softmax

__all__ = ["moba_reference", "moba_selected_blocks"]


def _block_of(S: int, block_size: int) -> jax.Array:
    return jnp.arange(S) // block_size


def moba_selected_blocks(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S H D"],
    *,
    block_size: int,
    top_k: int,
    causal: bool = False,
    kv_mask: Bool[Array, "B S"] | None = None,
) -> Bool[Array, "B H T NB"]:
    """Which key blocks each query selects (steps 1-3 of the module docstring)."""
    B, T, H, D = q.shape
    S = k.shape[1]
    nb = -(-S // block_size)
    real = jnp.ones((B, S), bool) if kv_mask is None else kv_mask
    q, k = (jax.lax.stop_gradient(x.astype(jnp.float32)) for x in (q, k))
    k = jnp.where(real[:, :, None, None], k, 0.0)
    member = (_block_of(S, block_size)[:, None] == jnp.arange(nb)[None, :]) & real[:, :, None]  # [B, S, NB]
    count = jnp.sum(member, axis=1)  # [B, NB] real keys per block
    mean = jnp.einsum("bsn,bshd->bnhd", member.astype(jnp.float32), k) / jnp.maximum(count, 1)[:, :, None, None]
    score = jnp.einsum("bthd,bnhd->bhtn", q, mean)
    has_real = (count > 0)[:, None, None, :]
    score = jnp.where(has_real, score, -jnp.inf)
    if causal:
        own = (jnp.arange(T) // block_size)[:, None]
        blocks = jnp.arange(nb)[None, :]
        score = jnp.where(blocks > own, -jnp.inf, score)
        score = jnp.where((blocks == own) & has_real, jnp.inf, score)
    # rank of block J among the query's blocks: how many come before it in top_k's order
    higher = score[..., None, :] > score[..., :, None]  # [..., J, J'] block J' beats J
    tie_before = (score[..., None, :] == score[..., :, None]) & (jnp.arange(nb)[None, :] < jnp.arange(nb)[:, None])
    rank = jnp.sum(higher | tie_before, axis=-1)
    return (rank < top_k) & (score > -jnp.inf)


def moba_reference(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S H D"],
    v: Float[Array, "B S H Dv"],
    *,
    block_size: int,
    top_k: int,
    causal: bool = False,
    kv_mask: Bool[Array, "B S"] | None = None,
) -> Float[Array, "B T H Dv"]:
    """MoBA as a dense masked softmax over the selected blocks' keys (float32)."""
    B, T, H, D = q.shape
    S = k.shape[1]
    real = jnp.ones((B, S), bool) if kv_mask is None else kv_mask
    selected = moba_selected_blocks(q, k, block_size=block_size, top_k=top_k, causal=causal, kv_mask=kv_mask)
    visible = selected[..., _block_of(S, block_size)] & real[:, None, None, :]  # [B, H, T, S]
    if causal:
        visible = visible & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    k, v = (jnp.where(real[:, :, None, None], x, 0.0) for x in (k, v))
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.float32(D))
    return jnp.einsum("bhts,bshe->bthe", masked_softmax(logits, visible), v)
