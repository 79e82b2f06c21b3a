"""Readable references of ``ops.gated_linear``: the recurrence token by token, and its quadratic form.

Same conventions as the engine: q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, ``log_decay`` g
``[B, T, H]`` (scalar gate) or ``[B, T, H, Dk]`` (diagonal gate), state ``[B, H, Dk, Dv]``,
``scale`` on the queries (default ``Dk ** -0.5``), a ``kv_mask=False`` position is an identity
step (no write, no decay). Float32 throughout. Slow on purpose: O(T) sequential steps, or a
``[T, T]`` (times Dk) decay matrix.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

__all__ = ["gated_linear_recurrent", "gated_linear_quadratic"]


def _prepare(q, k, v, log_decay, kv_mask, scale):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v, g = (x.astype(jnp.float32) for x in (q, k, v, log_decay))
    if g.ndim == 3:  # a scalar gate decays every key channel alike
        g = jnp.broadcast_to(g[..., None], k.shape)
    if kv_mask is not None:
        keep = kv_mask[:, :, None, None]
        k, v, g = jnp.where(keep, k, 0.0), jnp.where(keep, v, 0.0), jnp.where(keep, g, 0.0)
    return q * scale, k, v, g


def gated_linear_recurrent(
    q: Float[Array, "B T H Dk"],
    k: Float[Array, "B T H Dk"],
    v: Float[Array, "B T H Dv"],
    log_decay: Float[Array, "B T H"] | Float[Array, "B T H Dk"],
    *,
    kv_mask: Bool[Array, "B T"] | None = None,
    initial_state: Float[Array, "B H Dk Dv"] | None = None,
    scale: float | None = None,
) -> tuple[Float[Array, "B T H Dv"], Float[Array, "B H Dk Dv"]]:
    """``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)``, one token at a time.

    Returns ``(out, final_state)``.
    """
    q, k, v, g = _prepare(q, k, v, log_decay, kv_mask, scale)
    B, T, H, Dk = q.shape
    state = jnp.zeros((B, H, Dk, v.shape[-1]), jnp.float32) if initial_state is None else initial_state

    def token(state, x):
        q_t, k_t, v_t, g_t = x  # [B, H, Dk], [B, H, Dk], [B, H, Dv], [B, H, Dk]
        state = jnp.exp(g_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
        o_t = jnp.sum(q_t[..., :, None] * state, axis=-2)
        return state, o_t

    time_major = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g))
    state, out = lax.scan(token, state.astype(jnp.float32), time_major)
    return jnp.moveaxis(out, 0, 1), state


def gated_linear_quadratic(
    q: Float[Array, "B T H Dk"],
    k: Float[Array, "B T H Dk"],
    v: Float[Array, "B T H Dv"],
    log_decay: Float[Array, "B T H"] | Float[Array, "B T H Dk"],
    *,
    kv_mask: Bool[Array, "B T"] | None = None,
    scale: float | None = None,
) -> Float[Array, "B T H Dv"]:
    """The parallel form: ``o_i = sum_{j <= i} (sum_d q_id k_jd D_ijd) v_j`` with an explicit decay matrix.

    ``D_ijd = prod_{j < m <= i} exp(g_md)`` for j <= i, else 0: the product of the decays
    applied to key j's write between its step and query i's. Finite log decays only.
    """
    q, k, v, g = _prepare(q, k, v, log_decay, kv_mask, scale)
    T = q.shape[1]
    i = jnp.arange(T)[:, None, None]
    j = jnp.arange(T)[None, :, None]
    m = jnp.arange(T)[None, None, :]
    between = ((j < m) & (m <= i)).astype(jnp.float32)  # [T(i), T(j), T(m)]
    log_d = jnp.einsum("ijm,bmhd->bhijd", between, g)
    causal = (jnp.arange(T)[:, None] >= jnp.arange(T)[None, :])[..., None]
    decay = jnp.where(causal, jnp.exp(log_d), 0.0)  # [B, H, T, T, Dk]
    weights = jnp.einsum("bihd,bjhd,bhijd->bhij", q, k, decay)
    return jnp.einsum("bhij,bjhe->bihe", weights, v)
