"""The delta rule token by token: the readable reference of ``ops.delta_rule``.

State S_t [Dk, Dv] per (batch, head), the layout of the engine (and of fla). With
a_t = exp(log_decay_t) (1 when there is no decay):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale q_t)

which is the papers' S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T written for
the transposed state. A position with ``kv_mask`` False is skipped: the state passes through
unchanged (its k, v, beta, decay are replaced by zeros with ``where`` and the old state is
selected, so whatever they held never enters), and its query still reads the state. Slow on purpose (one ``lax.scan`` step per token), float32.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

__all__ = ["delta_rule_recurrent"]


def delta_rule_recurrent(
    q: Float[Array, "B T H Dk"],
    k: Float[Array, "B T H Dk"],
    v: Float[Array, "B T H Dv"],
    beta: Float[Array, "B T H"],
    log_decay: Float[Array, "B T H"] | None = None,
    *,
    kv_mask: Bool[Array, "B T"] | None = None,
    initial_state: Float[Array, "B H Dk Dv"] | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
) -> Float[Array, "B T H Dv"] | tuple[Float[Array, "B T H Dv"], Float[Array, "B H Dk Dv"]]:
    """Outputs [B, T, H, Dv], and the final state [B, H, Dk, Dv] too when asked; float32."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    q, k, v, beta = f32(q), f32(k), f32(v), f32(beta)
    log_decay = jnp.zeros_like(beta) if log_decay is None else f32(log_decay)
    keep = jnp.ones((B, T), bool) if kv_mask is None else kv_mask
    # zero the skipped positions' inputs too: the where below then sees no NaN, nor its gradient
    k, v = (jnp.where(keep[:, :, None, None], x, 0.0) for x in (k, v))
    beta, log_decay = (jnp.where(keep[:, :, None], x, 0.0) for x in (beta, log_decay))
    state = jnp.zeros((B, H, Dk, Dv), jnp.float32) if initial_state is None else f32(initial_state)

    def step(S, xs):
        q_t, k_t, v_t, b_t, g_t, keep_t = xs  # [B, H, Dk], [B, H, Dk], [B, H, Dv], [B, H], [B, H], [B]
        decayed = jnp.exp(g_t)[..., None, None] * S
        read = jnp.einsum("bhk,bhkv->bhv", k_t, decayed)  # what the state holds at k_t
        written = decayed + b_t[..., None, None] * jnp.einsum("bhk,bhv->bhkv", k_t, v_t - read)
        S = jnp.where(keep_t[:, None, None, None], written, S)
        return S, jnp.einsum("bhk,bhkv->bhv", scale * q_t, S)

    time_major = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
    xs = tuple(time_major(x) for x in (q, k, v, beta, log_decay, keep))
    state, out = lax.scan(step, state, xs)
    out = jnp.moveaxis(out, 0, 1)
    return (out, state) if output_final_state else out
