"""Per-head feature normalisations of queries and keys, ``x * rsqrt(reduce(x^2) + eps)``.

Two, because the papers use two, and their ``eps`` sits inside the square root over a
different reduction: ``l2_normalise`` sums the squares (unit vectors: the delta rule needs
``|k| = 1`` for its update to be a projection), ``rms_normalise`` averages them (unit RMS, a
scale-free input to a gate). A zero vector maps to zero with a finite gradient in both (a
padded key, zeroed before, stays zero and passes no NaN back).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

__all__ = ["l2_normalise", "rms_normalise"]


def l2_normalise(x: Float[Array, "... D"], eps: float) -> Float[Array, "... D"]:
    """x / sqrt(sum(x^2) + eps) over the last axis: unit vectors (DeltaNet's q and k)."""
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def rms_normalise(x: Float[Array, "... D"], eps: float) -> Float[Array, "... D"]:
    """x / sqrt(mean(x^2) + eps) over the last axis: unit RMS (GLA's gate input)."""
    return x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
