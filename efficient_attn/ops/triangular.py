"""Unit lower triangular solves with matmuls only: the UT transform of ``ops.delta_rule``.

Solves L X = B for X, with L [..., C, C] unit lower triangular (ones on the diagonal; only
the strictly lower triangle is read, like ``solve_triangular(lower=True, unit_diagonal=True)``)
and B [..., C, W]. Why not LAPACK: jaxlib's CPU ``trsm`` custom call, batched inside a jitted
training step, deadlocked on this machine's two cores (every thread blocked in its
``ParallelBatchMap``, no CPU used; the same failure as LAPACK's QR in ``variants/kernel.py``).
Matmuls go through XLA's own dot emitter and cannot hit that pool.

Method (block forward substitution, recursively halved). Split the rows into a top half t and
a bottom half b:

    L = [[L_tt, 0], [L_bt, L_bb]]:   X_t = L_tt^{-1} B_t,   X_b = L_bb^{-1} (B_b - L_bt X_t).

Leaves of at most ``LEAF`` rows are inverted exactly: with N = I - L strictly lower triangular,
N is nilpotent (N^c = 0 for c rows), so

    L^{-1} = (I - N)^{-1} = sum_{j < c} N^j = (I + N)(I + N^2)(I + N^4) ... (I + N^{2^(m-1)}),

m = ceil(log2 c) factors. Cost: O(C^2 W + C LEAF^2) flops per solve, as forward substitution,
in matmuls of size C / 2, C / 4, ...; depth log2(C / LEAF) of Python recursion, unrolled at
trace time. Autodiff goes through the matmuls. Numerically this is forward substitution by
blocks; the series only runs on leaves of at most ``LEAF`` rows.

The readable reference is ``solve_unit_lower_reference``: forward substitution one row at a
time (a ``lax.scan``), the textbook recurrence x_r = b_r - sum_{i < r} L_ri x_i.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

__all__ = ["solve_unit_lower", "solve_unit_lower_reference", "LEAF"]

LEAF = 8  # rows inverted by the nilpotent series; beyond this the solve halves the rows


def _check(lhs, rhs) -> None:
    if lhs.ndim < 2 or lhs.shape[-1] != lhs.shape[-2]:
        raise ValueError(f"solve_unit_lower: lhs must be square in its last two axes [..., C, C], got {list(lhs.shape)}")
    if rhs.ndim != lhs.ndim or rhs.shape[:-1] != lhs.shape[:-1]:
        raise ValueError(
            f"solve_unit_lower: rhs must be [..., C, W] with the batch axes and C of lhs {list(lhs.shape)}, "
            f"got {list(rhs.shape)}"
        )


def _leaf_inverse(lhs: Float[Array, "... c c"]) -> Float[Array, "... c c"]:
    c = lhs.shape[-1]
    eye = jnp.eye(c, dtype=lhs.dtype)
    nilpotent = -jnp.tril(lhs, -1)
    inverse, power = eye, nilpotent
    for _ in range((c - 1).bit_length()):  # ceil(log2 c) factors (I + N^{2^i})
        inverse = inverse @ (eye + power)
        power = power @ power
    return inverse


def solve_unit_lower(lhs: Float[Array, "... C C"], rhs: Float[Array, "... C W"]) -> Float[Array, "... C W"]:
    """X with L X = B, L unit lower triangular (its diagonal and upper triangle are not read)."""
    _check(lhs, rhs)
    c = lhs.shape[-1]
    if c <= LEAF:
        return _leaf_inverse(lhs) @ rhs
    h = c // 2
    top = solve_unit_lower(lhs[..., :h, :h], rhs[..., :h, :])
    bottom_rhs = rhs[..., h:, :] - lhs[..., h:, :h] @ top
    bottom = solve_unit_lower(lhs[..., h:, h:], bottom_rhs)
    return jnp.concatenate([top, bottom], axis=-2)


def solve_unit_lower_reference(lhs: Float[Array, "... C C"], rhs: Float[Array, "... C W"]) -> Float[Array, "... C W"]:
    """Forward substitution row by row: x_r = b_r - sum_{i < r} L_ri x_i (the ground truth)."""
    _check(lhs, rhs)
    c = lhs.shape[-1]
    strict = jnp.tril(lhs, -1)

    def row(x, r):
        x_r = rhs[..., r, :] - jnp.einsum("...i,...iw->...w", strict[..., r, :], x)
        return x.at[..., r, :].set(x_r), None

    solution, _ = lax.scan(row, jnp.zeros_like(rhs), jnp.arange(c))
    return solution
