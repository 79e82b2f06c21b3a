"""Moving tokens by a permutation: the sorts of ``reformer`` (by hash bucket) and of packed
linear attention (by segment id) gather whole rows by index, attend, and undo the sort.

    take_rows(x, index)[r, t] = x[r, index[r, t]]          (whole trailing vectors move)
    inverse_permutation(perm)[r, perm[r, t]] = t            (one scatter: O(T), not a sort)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

__all__ = ["take_rows", "inverse_permutation"]


def take_rows(x: Array, index: Int[Array, "R T"]) -> Array:
    """``x[r, index[r]]`` for every leading row r of ``x`` [R, T, ...]: one index per row of
    trailing values (a take_along_axis with a broadcast index builds an index per element,
    several times slower on CPU)."""
    return jax.vmap(lambda a, i: a[i])(x, index)


def inverse_permutation(perm: Int[Array, "... T"]) -> Int[Array, "... T"]:
    """inv with inv[perm[t]] = t along the last axis, by one scatter: O(T), where a second
    argsort is O(T log T). ``perm`` must be a permutation of 0..T-1 on every row."""
    flat = perm.reshape(-1, perm.shape[-1])
    t = jnp.arange(perm.shape[-1], dtype=perm.dtype)
    inv = jax.vmap(lambda p: jnp.zeros_like(p).at[p].set(t, unique_indices=True))(flat)
    return inv.reshape(perm.shape)
