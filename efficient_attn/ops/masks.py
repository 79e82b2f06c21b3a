"""Visibility of (query, key) pairs implied by a ``Mask``.

``dense_visibility`` materialises the ``[B, H|1, T, S]`` boolean matrix: only quadratic
variants ("full", the learned ones) may call it. Subquadratic engines build visibility per
block from ``causal_block``/``kv_mask`` slices instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

from efficient_attn.core import Mask


def causal_visibility(T: int, S: int, q_offset=0, k_offset=0) -> Bool[Array, "T S"]:
    """``[T, S]`` True where key position ``k_offset + j <= q_offset + i``."""
    qi = q_offset + jnp.arange(T)[:, None]
    kj = k_offset + jnp.arange(S)[None, :]
    return kj <= qi


def dense_visibility(mask: Mask | None, B: int, T: int, S: int) -> Bool[Array, "B Hm T S"] | None:
    """The full boolean visibility matrix (None when everything is visible). O(T S) memory."""
    if mask is None:
        return None
    vis = None

    def _and(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if mask.causal:
        vis = _and(vis, causal_visibility(T, S)[None, None])
    if mask.kv_mask is not None:
        vis = _and(vis, mask.kv_mask[:, None, None, :])
    if mask.dense is not None:
        vis = _and(vis, mask.dense)
    if vis is None:
        return None
    return jnp.broadcast_to(vis, (B,) + vis.shape[1:]) if vis.shape[0] == 1 else vis


def masked_softmax(logits, visible, axis: int = -1):
    """Softmax over ``axis`` that gives all-zero rows where nothing is visible (never NaN).

    ``visible`` is a boolean broadcastable to ``logits`` or None (all visible).
    """
    if visible is None:
        return jax.nn.softmax(logits, axis=axis)
    neg = jnp.finfo(logits.dtype).min
    z = jnp.where(visible, logits, neg)
    z = z - jnp.max(z, axis=axis, keepdims=True)
    e = jnp.where(visible, jnp.exp(z), 0.0)
    denom = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(denom > 0, denom, 1.0)
