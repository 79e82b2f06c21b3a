"""The delta rule, chunk-parallel (WY / UT transform): the engine of ``deltanet`` and
``gated_deltanet``.

Recurrence (causal), per batch and head, with the state S_t [Dk, Dv] (fla's layout; the
papers write its transpose, S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T (scale q_t)

beta_t in (0, 1) is the write strength; a_t = exp(log_decay_t) in (0, 1] a scalar forget gate
(``log_decay`` None: a_t = 1, DeltaNet; Yang et al. 2024). Equivalently the state takes one
step of gradient descent on ||S^T k_t - v_t||^2 / 2 with learning rate beta_t: it replaces the
value stored along k_t instead of adding to it (Schlag et al. 2021). The engine does NOT
normalise keys: with ||k_t|| = 1 each step is a contraction (eigenvalues of I - beta k k^T in
[1 - beta, 1]); the variants L2-normalise keys and queries before calling it, as DeltaNet does.

Chunk form (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length"; the gated form of Yang, Kautz & Hatamizadeh 2025). Cut the sequence into
chunks of C positions r = 1..C, with S_0 the state entering the chunk and g_r = sum_{i <= r}
log a_i the decay accumulated inside the chunk. Unrolling the recurrence shows

    S_r = e^{g_r} S_0 + sum_{i <= r} e^{g_r - g_i} k_i w_i^T,
    w_r = beta_r (v_r - e^{g_r} S_0^T k_r - sum_{i < r} e^{g_r - g_i} (k_r . k_i) w_i),

i.e. (I + A) W = diag(beta) V - diag(beta e^g) K S_0 with the strictly lower triangular
A_ri = beta_r e^{g_r - g_i} (k_r . k_i), i < r. One unit lower triangular solve per chunk (the
UT transform; C x C, independent of the state, so every chunk is solved at once, with matmuls
only: ``ops.triangular``) gives

    U = (I + A)^{-1} diag(beta) V,   Wk = (I + A)^{-1} diag(beta e^g) K,   W = U - Wk S_0,
    O = diag(e^g) (scale Q) S_0 + tril((scale Q) K^T * e^{g_r - g_i}) W,
    S_C = e^{g_C} S_0 + (K * e^{g_C - g})^T W.

Only the state hand-over S_0 -> S_C is sequential: a ``lax.scan`` over the N / C chunks. Time
O(N C (Dk + Dv) + N Dk Dv), memory O(N C + (N / C) Dk Dv) in the forward and, through autodiff
of the scan (which saves one state per chunk), in the backward: no [T, T] array is formed.

Numerics. Every input is cast to float32 first; every product and sum is float32. Gates stay
in log space: the decay between positions i <= r of a chunk is exp(G_ri), G_ri = g_r - g_i the
sum of the log decays in between, never a ratio of cumulative products (which under- and
overflow). G is summed over its own segment (a masked cumulative sum over the C x C pairs,
Mamba-2's "segsum"), not taken as a difference of two prefix sums: the rounding is then that of
the segment, not of the chunk's prefix, and a log decay of -inf (a gate of exactly 0: forget
everything before) gives exp(-inf) = 0, not -inf - -inf = NaN. Pairs i > r are masked after
``exp`` of a 0 there, so no exponent is ever positive when log_decay <= 0 (required: a gate
in (0, 1]) and no inf * 0 reaches a gradient.

Padding. A position with ``kv_mask`` False is an identity step: its k, v, beta and log_decay
are replaced by zeros with ``where`` (not a product, so a NaN or inf there cannot leak into
other outputs or any gradient): beta 0 writes nothing, log decay 0 forgets nothing. Its query
still reads the state (as a padded query of softmax attention still sees the real keys). The
tail that pads T to a multiple of C is the same identity step. A non-finite key, value,
beta or log decay (NaN or +inf) is an identity step in the products too, and every output
from it on is NaN (``masks.split_nonfinite_steps``): what the recurrence gives, with no
0 * NaN reaching an earlier output of the same chunk.

Layouts: q, k [B, T, H, Dk], v [B, T, H, Dv], beta and log_decay [B, T, H], states
[B, H, Dk, Dv] (those of ``ops.gated_linear``, with the same ``initial_state`` /
``output_final_state`` arguments).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float

from efficient_attn.ops.masks import poison_steps, split_nonfinite_steps
from efficient_attn.ops.triangular import solve_unit_lower

__all__ = ["delta_rule_attention", "delta_rule_step"]


def _check(name: str, x, want: tuple, what: str) -> None:
    if x is not None and tuple(x.shape) != want:
        raise ValueError(f"delta_rule: {name} must have shape {list(want)} ({what}), got {list(x.shape)}")


def _validate(q, k, v, beta, log_decay, kv_mask, initial_state, chunk) -> None:
    if q.ndim != 4:
        raise ValueError(f"delta_rule: q must be [B, T, H, Dk], got shape {list(q.shape)}")
    B, T, H, Dk = q.shape
    _check("k", k, (B, T, H, Dk), "same as q: the delta rule is self-attention")
    if v.ndim != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"delta_rule: v must be [B, T, H, Dv] with q's B, T, H = {B, T, H}, got {list(v.shape)}")
    _check("beta", beta, (B, T, H), "one write strength per token and head")
    _check("log_decay", log_decay, (B, T, H), "one log forget gate per token and head")
    _check("kv_mask", kv_mask, (B, T), "True = a real token")
    _check("initial_state", initial_state, (B, H, Dk, v.shape[-1]), "[B, H, Dk, Dv]")
    if kv_mask is not None and kv_mask.dtype != jnp.bool_:
        raise TypeError(f"delta_rule: kv_mask must be bool, got {kv_mask.dtype}; use kv_mask.astype(bool)")
    if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, (bool, np.bool_)) or chunk < 1:
        raise ValueError(f"delta_rule: chunk must be an int >= 1, got {chunk!r}")


def _chunked(x, n: int, C: int):
    """[B, T, H, ...] -> [B, H, n, C, ...], the tail padded with zeros (identity steps)."""
    B, T, H = x.shape[:3]
    pad = n * C - T
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((B, n, C, H) + x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def _log_decay_sums(lc: Float[Array, "... C"], strict: Bool[Array, "C C"]):
    """Chunk-local sums of log decays, each summed over its own segment (no subtraction):

    prefix g_r = sum_{m <= r} l_m,  segment G_ri = sum_{i < m <= r} l_m (i <= r; 0 above the
    diagonal),  tail R_i = sum_{m > i} l_m.  G and R are what g_r - g_i and g_C - g_i mean,
    computed without cancellation, and a log decay of -inf stays -inf instead of giving NaN.
    """
    prefix = jnp.cumsum(lc, axis=-1)
    seg = jnp.cumsum(jnp.where(strict, lc[..., :, None], 0.0), axis=-2)  # [.., r, i]
    inclusive_tail = jnp.flip(jnp.cumsum(jnp.flip(lc, -1), axis=-1), -1)
    tail = jnp.concatenate([inclusive_tail[..., 1:], jnp.zeros_like(lc[..., :1])], axis=-1)
    return prefix, seg, tail


def delta_rule_attention(
    q: Float[Array, "B T H Dk"],
    k: Float[Array, "B T H Dk"],
    v: Float[Array, "B T H Dv"],
    beta: Float[Array, "B T H"],
    log_decay: Float[Array, "B T H"] | None = None,
    *,
    kv_mask: Bool[Array, "B T"] | None = None,
    chunk: int = 64,
    initial_state: Float[Array, "B H Dk Dv"] | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
) -> Float[Array, "B T H Dv"] | tuple[Float[Array, "B T H Dv"], Float[Array, "B H Dk Dv"]]:
    """Causal (gated) delta rule by chunks of ``chunk`` positions (see the module docstring).

    Returns out [B, T, H, Dv] float32, or ``(out, final_state)`` when ``output_final_state``
    (final_state [B, H, Dk, Dv], the state after the last token).
    ``scale`` multiplies the queries (None: Dk ** -0.5, fla's default).
    """
    _validate(q, k, v, beta, log_decay, kv_mask, initial_state, chunk)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    q, k, v, beta = f32(q), f32(k), f32(v), f32(beta)
    log_decay = jnp.zeros_like(beta) if log_decay is None else f32(log_decay)
    if kv_mask is not None:
        keep = kv_mask[:, :, None]
        k = jnp.where(keep[..., None], k, 0.0)
        v = jnp.where(keep[..., None], v, 0.0)
        beta = jnp.where(keep, beta, 0.0)
        log_decay = jnp.where(keep, log_decay, 0.0)
    (k, v, beta), (log_decay,), poisoned = split_nonfinite_steps(k, v, beta, gates=(log_decay,))
    state = jnp.zeros((B, H, Dk, Dv), jnp.float32) if initial_state is None else f32(initial_state)

    C = min(int(chunk), T)
    n = -(-T // C)
    qc, kc, vc = (_chunked(x, n, C) for x in (q * scale, k, v))  # [B, H, n, C, D]
    bc, lc = (_chunked(x, n, C) for x in (beta, log_decay))  # [B, H, n, C]

    with jax.named_scope("delta_rule_ut_transform"):
        incl = jnp.tril(jnp.ones((C, C), bool))
        strict = jnp.tril(jnp.ones((C, C), bool), -1)
        g, seg, tail = _log_decay_sums(lc, strict)
        decay = jnp.where(incl, jnp.exp(seg), 0.0)  # e^{g_r - g_i} for i <= r
        kk = jnp.einsum("bhnrd,bhnid->bhnri", kc, kc)
        a = jnp.where(strict, bc[..., :, None] * decay * kk, 0.0)
        lhs = a + jnp.eye(C, dtype=jnp.float32)
        rhs = jnp.concatenate([bc[..., None] * vc, (bc * jnp.exp(g))[..., None] * kc], axis=-1)
        sol = solve_unit_lower(lhs, rhs)  # matmuls only: LAPACK's trsm deadlocks (ops/triangular.py)
        u, wk = sol[..., :Dv], sol[..., Dv:]  # [B, H, n, C, Dv], [B, H, n, C, Dk]
        g_last = g[..., -1]  # [B, H, n]
        k_tail = kc * jnp.exp(tail)[..., None]  # decay from i to the chunk end

    with jax.named_scope("delta_rule_state_scan"):

        def hand_over(s, xs):
            u_c, wk_c, kt_c, gl_c = xs
            w = u_c - jnp.einsum("bhck,bhkv->bhcv", wk_c, s)
            s_next = jnp.exp(gl_c)[..., None, None] * s + jnp.einsum("bhck,bhcv->bhkv", kt_c, w)
            return s_next, s

        chunk_major = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731
        final, s_in = lax.scan(hand_over, state, tuple(chunk_major(x) for x in (u, wk, k_tail, g_last)))
        s_in = jnp.moveaxis(s_in, 0, 2)  # state entering each chunk [B, H, n, Dk, Dv]

    with jax.named_scope("delta_rule_output"):
        w = u - jnp.einsum("bhnck,bhnkv->bhncv", wk, s_in)
        qk = jnp.where(incl, jnp.einsum("bhnrd,bhnid->bhnri", qc, kc) * decay, 0.0)
        out = jnp.einsum("bhnck,bhnkv->bhncv", qc * jnp.exp(g)[..., None], s_in)
        out = out + jnp.einsum("bhnri,bhniv->bhnrv", qk, w)
        out = jnp.moveaxis(out, 1, 3).reshape(B, n * C, H, Dv)[:, :T]
    out = poison_steps(out, poisoned)
    if output_final_state:  # a bad step anywhere leaves the recurrence's state NaN
        return out, jnp.where(poisoned[:, -1, :, None, None], jnp.nan, final)
    return out


def delta_rule_step(
    q_t: Float[Array, "B H Dk"],
    k_t: Float[Array, "B H Dk"],
    v_t: Float[Array, "B H Dv"],
    beta_t: Float[Array, "B H"],
    log_decay_t: Float[Array, "B H"] | None,
    state: Float[Array, "B H Dk Dv"],
    *,
    scale: float | None = None,
) -> tuple[Float[Array, "B H Dv"], Float[Array, "B H Dk Dv"]]:
    """One token of the recurrence: ``(o_t, S_t)`` from S_{t-1} (decoding), float32."""
    Dk = q_t.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    q_t, k_t, v_t, beta_t, s = (x.astype(jnp.float32) for x in (q_t, k_t, v_t, beta_t, state))
    if log_decay_t is not None:
        s = jnp.exp(log_decay_t.astype(jnp.float32))[..., None, None] * s
    err = v_t - jnp.einsum("bhk,bhkv->bhv", k_t, s)  # new value minus what k_t retrieves
    s = s + jnp.einsum("bhk,bhv->bhkv", beta_t[..., None] * k_t, err)
    return jnp.einsum("bhk,bhkv->bhv", scale * q_t, s), s
