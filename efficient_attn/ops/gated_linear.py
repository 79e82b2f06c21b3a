"""Gated (decaying) linear attention, chunk-parallel: the engine of ``retnet``, ``gla``, ``mamba2``.

The recurrence, per batch and head, with a state S_t of shape [Dk, Dv]:

    S_t = diag(a_t) S_{t-1} + k_t v_t^T,        o_t = scale * S_t^T q_t,        a_t = exp(g_t)

``log_decay`` g is either one scalar per (batch, token, head), ``[B, T, H]`` (RetNet: a constant
per head; Mamba-2: data dependent), broadcast over the Dk rows of S, or one value per key
channel, ``[B, T, H, Dk]`` (GLA's diagonal gate). g <= 0 (a decay in (0, 1]); g = -inf (a
decay of exactly 0) is allowed and forgets everything before the current token. Unrolled,

    o_i = scale * sum_{j <= i} sum_d q_id k_jd exp(G_ijd) v_j,    G_ijd = sum_{j < m <= i} g_md,

plus scale * (q_i * exp(G_i,-1))^T S_init for an initial state (its decay from position -1).

Chunk-parallel form (GLA, Yang et al. 2024; Mamba-2's SSD, Dao & Gu 2024). The sequence is
cut into chunks of C positions (the last one padded with identity steps: g = 0, k = v = q = 0).
``lax.scan`` runs over the N / C chunks (not over tokens) carrying S. Inside a chunk, with
positions 0..C-1 and S_0 the state before the chunk:

    intra:  o_i += scale * sum_{j <= i} (sum_d q_id k_jd exp(G_ijd)) v_j      (C x C scores)
    inter:  o_i += scale * (q_i * exp(P_i))^T S_0,            P_i = sum_{m <= i} g_m
    state:  S_0 <- exp(P_{C-1}) * S_0 + sum_j (k_j * exp(R_j)) v_j^T,  R_j = sum_{m > j} g_m

Every exponent is a sum of log decays over a segment, so it is <= 0: no exp overflows and
nothing is ever divided by a cumulative product of decays (the division exp(P_i) / exp(P_j)
is what overflowed into inf / NaN gradients in early chunked GLA kernels). Each segment sum
is computed directly -- G by a masked cumulative sum over the C x C pairs (Mamba-2's
"segsum"), P by a prefix sum, R by an exclusive suffix sum -- rather than as a difference of
two prefix sums, whose rounding would be that of the large prefix, not of the segment.

Cost. Time O(N C Dk + N Dk Dv); memory O(N (Dk + Dv) + (N / C) Dk Dv) for the scan's saved
states, linear in N in both passes (autodiff through the scan). With scalar gates the
per-chunk residuals are C x C; with diagonal gates the pairwise decays exp(G) are C x C x Dk
per chunk, which saved for every chunk would be N C Dk floats (as large as an N x N matrix
once C Dk >= N), so the chunk step is rematerialised (``jax.checkpoint``) in that case: the
backward pass recomputes each chunk's pairwise decays instead of storing them.

Masks. The recurrence is causal by construction; ``causal=False`` is refused. ``kv_mask``:
a masked position is an identity step -- its key and value are replaced by zeros and its log
decay by 0 with ``where`` (not a product, so NaN or inf there cannot leak, forward or
backward), so it neither writes to the state nor decays it. A non-finite key, value or log
gate (NaN or +inf; -inf is a gate of 0) is the same identity step in the products, and every
output from it on is NaN (``masks.split_nonfinite_steps``): the recurrence's own result, with
no 0 * NaN reaching an earlier output of the same chunk. Its query is not masked: it
still reads the state (the base class zeroes q_mask=False outputs). A query that sees no
real key reads the initial state (zeros by default), so it gets exactly zero output.

Numerics: every input is cast to float32 before any product and the state, scores and
outputs are float32 whatever the input dtype; the output is float32.

``initial_state`` / ``final_state``: ``[B, H, Dk, Dv]`` float32 (S above), so a prefill can
hand its state to ``gated_linear_step`` or to the next segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float

from efficient_attn.ops.masks import poison_steps, split_nonfinite_steps

__all__ = ["gated_linear_attention", "gated_linear_step", "segment_sums"]


def _pad_len(x, size: int):
    pad = size - x.shape[1]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


def segment_sums(g: Float[Array, "... C"], axis: int = -1) -> Float[Array, "... C C"]:
    """``G[..., i, j] = sum_{j < m <= i} g[..., m]`` for j <= i, ``-inf`` above the diagonal.

    ``g``'s position axis is ``axis``; the result has the query axis i there and the key axis
    j right after it (so ``[..., C, D]`` with ``axis=-2`` gives ``[..., C, C, D]``). Computed as
    a cumulative sum of the masked pairs, so each entry carries only its segment's rounding.
    """
    axis = axis % g.ndim
    C = g.shape[axis]
    i = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    j = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    trailing = (1,) * (g.ndim - axis - 1)
    below = (i > j).reshape((C, C) + trailing)
    on_or_below = (i >= j).reshape((C, C) + trailing)
    x = jnp.expand_dims(g, axis + 1)  # [..., C (m), 1 (j), ...]
    x = jnp.where(below, x, 0.0)  # entry (m, j) holds g_m when m > j
    s = jnp.cumsum(x, axis=axis)  # (i, j): sum over j < m <= i
    return jnp.where(on_or_below, s, -jnp.inf)


def _exclusive_suffix(g, axis: int):
    """``R[j] = sum_{m > j} g[m]`` along ``axis``: a reverse cumulative sum of g shifted by one."""
    axis = axis % g.ndim
    widths = [(0, 0)] * g.ndim
    widths[axis] = (0, 1)
    shifted = jnp.pad(lax.slice_in_dim(g, 1, None, axis=axis), widths)  # shifted[j] = g[j + 1], 0 last
    return jnp.flip(jnp.cumsum(jnp.flip(shifted, axis), axis=axis), axis)


def _chunk_step(scale: float, diagonal: bool):
    def step(state, xs):
        q, k, v, g = xs  # [B, H, C, Dk], [B, H, C, Dk], [B, H, C, Dv], [B, H, C] or [B, H, C, Dk]
        if diagonal:
            decay = jnp.exp(segment_sums(g, axis=-2))  # [B, H, C, C, Dk]
            scores = jnp.einsum("bhid,bhjd,bhijd->bhij", q, k, decay)
            prefix = jnp.cumsum(g, axis=-2)  # [B, H, C, Dk]
            suffix = _exclusive_suffix(g, axis=-2)
            q_in = q * jnp.exp(prefix)
            k_out = k * jnp.exp(suffix)
            total = jnp.exp(prefix[..., -1, :])[..., :, None]  # [B, H, Dk, 1]
        else:
            decay = jnp.exp(segment_sums(g, axis=-1))  # [B, H, C, C]
            scores = jnp.einsum("bhid,bhjd->bhij", q, k) * decay
            prefix = jnp.cumsum(g, axis=-1)  # [B, H, C]
            suffix = _exclusive_suffix(g, axis=-1)
            q_in = q * jnp.exp(prefix)[..., None]
            k_out = k * jnp.exp(suffix)[..., None]
            total = jnp.exp(prefix[..., -1])[..., None, None]  # [B, H, 1, 1]
        out = jnp.einsum("bhij,bhje->bhie", scores, v) + jnp.einsum("bhid,bhde->bhie", q_in, state)
        state = total * state + jnp.einsum("bhjd,bhje->bhde", k_out, v)
        return state, out * scale

    return jax.checkpoint(step) if diagonal else step


def _is_size(n) -> bool:
    """A Python or numpy integer >= 1 (not a bool)."""
    return isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_)) and n >= 1


def _check(q, k, v, log_decay, kv_mask, initial_state, chunk):
    name = "gated_linear_attention"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{name}: q, k, v must be [B, T, H, D], got shapes {q.shape}, {k.shape}, {v.shape}")
    B, T, H, Dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{name}: k must have q's shape {q.shape} (self attention, T == S), got {k.shape}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"{name}: v must be [B, T, H, Dv] = [{B}, {T}, {H}, Dv], got {v.shape}")
    if log_decay.shape not in ((B, T, H), (B, T, H, Dk)):
        raise ValueError(
            f"{name}: log_decay must be [B, T, H] = {(B, T, H)} (scalar gate) or [B, T, H, Dk] = "
            f"{(B, T, H, Dk)} (diagonal gate), got {log_decay.shape}"
        )
    if kv_mask is not None and (kv_mask.shape != (B, T) or kv_mask.dtype != jnp.bool_):
        raise ValueError(f"{name}: kv_mask must be bool [B, T] = [{B}, {T}], got {kv_mask.dtype} {kv_mask.shape}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, v.shape[3]):
        raise ValueError(
            f"{name}: initial_state must be [B, H, Dk, Dv] = {(B, H, Dk, v.shape[3])}, got {initial_state.shape}"
        )
    if not _is_size(chunk):
        raise ValueError(f"{name}: chunk must be an int >= 1, got {chunk!r}")


def gated_linear_attention(
    q: Float[Array, "B T H Dk"],
    k: Float[Array, "B T H Dk"],
    v: Float[Array, "B T H Dv"],
    log_decay: Float[Array, "B T H"] | Float[Array, "B T H Dk"],
    *,
    causal: bool = True,
    kv_mask: Bool[Array, "B T"] | None = None,
    chunk: int = 64,
    initial_state: Float[Array, "B H Dk Dv"] | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
) -> Float[Array, "B T H Dv"] | tuple[Float[Array, "B T H Dv"], Float[Array, "B H Dk Dv"]]:
    """Causal gated linear attention by chunks (see the module docstring); float32 output.

    ``scale`` multiplies the queries (default ``Dk ** -0.5``). Returns ``out``, or
    ``(out, final_state)`` when ``output_final_state``.
    """
    if not causal:
        raise ValueError(
            "gated_linear_attention: a decaying recurrence is causal by construction (state after "
            "token t); causal=False has no meaning here -- pass causal=True"
        )
    _check(q, k, v, log_decay, kv_mask, initial_state, chunk)
    B, T, H, Dk = q.shape
    Dv = v.shape[3]
    scale = Dk**-0.5 if scale is None else float(scale)
    diagonal = log_decay.ndim == 4
    q, k, v, g = (x.astype(jnp.float32) for x in (q, k, v, log_decay))
    if kv_mask is not None:
        keep = kv_mask[:, :, None]
        k = jnp.where(keep[..., None], k, 0.0)
        v = jnp.where(keep[..., None], v, 0.0)
        g = jnp.where(keep[..., None] if diagonal else keep, g, 0.0)
    (k, v), (g,), poisoned = split_nonfinite_steps(k, v, gates=(g,))
    C = min(int(chunk), T)
    n = -(-T // C)

    def chunks(x):  # [B, T, H, ...] -> [n, B, H, C, ...], padded with identity steps (zeros)
        x = _pad_len(x, n * C).reshape((B, n, C) + x.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

    state = jnp.zeros((B, H, Dk, Dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    with jax.named_scope("gated_linear_chunks"):
        state, out = lax.scan(_chunk_step(scale, diagonal), state, tuple(chunks(x) for x in (q, k, v, g)))
    out = jnp.moveaxis(jnp.moveaxis(out, 0, 1), 3, 2).reshape(B, n * C, H, Dv)[:, :T]
    out = poison_steps(out, poisoned)
    if output_final_state:  # a bad step anywhere leaves the recurrence's state NaN
        state = jnp.where(poisoned[:, -1, :, None, None], jnp.nan, state)
        return out, state
    return out


def gated_linear_step(
    q_t: Float[Array, "B H Dk"],
    k_t: Float[Array, "B H Dk"],
    v_t: Float[Array, "B H Dv"],
    log_decay_t: Float[Array, "B H"] | Float[Array, "B H Dk"],
    state: Float[Array, "B H Dk Dv"],
    *,
    kv_mask_t: Bool[Array, " B"] | None = None,
    scale: float | None = None,
) -> tuple[Float[Array, "B H Dv"], Float[Array, "B H Dk Dv"]]:
    """One token of the recurrence: ``S = diag(exp(g)) S + k v^T``, ``o = scale * S^T q``.

    Pure and jit-able (scan it for decoding). ``kv_mask_t`` False makes the token an identity
    step, as in ``gated_linear_attention``. Returns ``(o_t, state)``, both float32.
    """
    scale = q_t.shape[-1] ** -0.5 if scale is None else float(scale)
    q_t, k_t, v_t, g = (x.astype(jnp.float32) for x in (q_t, k_t, v_t, log_decay_t))
    if kv_mask_t is not None:
        keep = kv_mask_t[:, None]
        k_t = jnp.where(keep[..., None], k_t, 0.0)
        v_t = jnp.where(keep[..., None], v_t, 0.0)
        g = jnp.where(keep[..., None] if g.ndim == 3 else keep, g, 0.0)
    a = jnp.exp(g)[..., :, None] if g.ndim == 3 else jnp.exp(g)[..., None, None]
    state = a * state.astype(jnp.float32) + jnp.einsum("bhd,bhe->bhde", k_t, v_t)
    return scale * jnp.einsum("bhd,bhde->bhe", q_t, state), state
