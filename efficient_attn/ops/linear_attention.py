"""Linear attention from feature maps: the engine of ``linear``, ``performer`` and ``cosformer``.

Given feature maps phi(Q) [B, T, H, F] and phi(K) [B, S, H, F] (computed by the variant),

    out_i = sum_j (phi(q_i) . phi(k_j)) v_j  /  sum_j phi(q_i) . phi(k_j)

over the keys j visible to query i, never forming the T x S matrix:

non-causal (reassociation, Katharopoulos et al. 2020):
    KV = phi(K)^T [V | 1]                        [F, Dv + 1]
    [num | den]_i = phi(q_i) KV                  time O(N F Dv), memory O(N (F + Dv) + F Dv)

causal (chunk-parallel; the form of fla / GLA, Yang et al. 2024): the sequence is cut into
chunks of C positions (padded to a multiple of C with zero features, which contribute
nothing). Within a chunk the C x C scores phi(Q_c) phi(K_c)^T are masked to j <= i and applied
quadratically; across chunks a prefix state  S = sum over earlier chunks of phi(K)^T [V | 1]
is carried by ``lax.scan`` over the N / C chunks (not over tokens):

    [num | den]_c = tril(phi(Q_c) phi(K_c)^T) [V_c | 1]  +  phi(Q_c) S,    S += phi(K_c)^T [V_c | 1]

time O(N C F + N F Dv), memory O(N C + (N / C) F Dv) with the scan's saved states (linear in N).

Masks. ``kv_mask``: a masked key's features (and value) are replaced by zeros with ``where``
(not a product, so a NaN or inf there cannot leak), so it adds nothing to the numerator or
the denominator. A query that sees nothing has den == 0 and gets exactly zero output. (The
variant must also keep a masked key out of its feature map's gradient: zero the raw key
with ``where`` before computing phi, as ``variants/kernel.py`` does.) Causal: the in-chunk
scores are masked with ``where`` AFTER every product that could hold a future NaN or Inf
(a future key's features times its weight), so past rows never read a future value.

Non-finite inputs (the rules of ``ops.masks``): a value row with a NaN or Inf entry is
zeroed and its key's features made NaN, so the queries that see it (causal: the later ones)
are NaN, the others unchanged; a NaN in a query's or a visible key's features makes the
rows that see it NaN, never zeros (see ``normalise``).

Numerics (safe in bfloat16): features and values are cast to float32 before any product
and every sum (states, scores, num, den) is accumulated in float32. The denominator is the
same contraction as the numerator, computed in the same matmul as an extra all-ones column of
V, so num and den see identical rounding. The output is

    out = num / (den + eps)  where den > 1e-30,   0 where den <= 1e-30,   NaN where den is NaN,

i.e. ``eps`` (0 allowed) only stabilises tiny positive denominators; a zero, negative or
underflowing one (nothing visible, pure cancellation noise when features can be negative as
in cosformer, or FAVOR+ products that underflow at huge logits) gives 0 instead of an inf
or a sign flip, unless num is not finite (then NaN). Gradients: num and den are both
multiplied by c = 1 / den held constant (``stop_gradient``; the ratio does not change), so
the backward pass never forms 1 / den^2, which underflows den^2 to 0 (and dq to inf) for a
den below 1e-19, as FAVOR+ gives at logits near 1000; the 1e-30 floor keeps c finite. A NaN
denominator (a NaN input reached the row) stays NaN: it is never read as "nothing
visible". The ``where`` is double (``num / where(den > 0, den + eps, 1)``) so its gradient
is finite too.

Optional per-key log scales (``k_log_scale``, used by FAVOR+). The true key feature is
phi(k_j) * exp(l_j); phi(k_j) is O(1) and l_j may be large (exp(l_j) would overflow or
underflow float32). Since multiplying every key's features by one constant leaves the ratio
unchanged, the engine rescales by exp(l_j - M) with M the largest visible l (``M`` under
``stop_gradient``: the output does not depend on it): non-causal, M = max_j l_j over real
keys; causal, M_i = max over the keys j <= i, tracked like an online softmax: the carried
state is kept at the scale of the running max of earlier chunks and rescaled when a chunk
raises it, and within a chunk row i uses the cumulative max up to i. Every exponent is then
<= 0, and output i depends only on keys j <= i, bit for bit.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from efficient_attn.ops.masks import split_nonfinite

__all__ = ["linear_attention", "normalise"]

_NEG = -1e30  # "no key yet" log scale: finite, so differences of two of them are 0, not NaN
_TINY_DEN = 1e-30  # denominators at or below this are underflow: 1 / den must stay finite in float32


def normalise(num: Float[Array, "... Dv"], den: Float[Array, "... 1"], eps: float) -> Float[Array, "... Dv"]:
    """``num / (den + eps)`` where ``den > 1e-30``; 0 where ``den <= 1e-30`` (NaN if ``num`` is
    not finite there); NaN where ``den`` is NaN. Finite forward and backward for finite inputs."""
    pos = den > _TINY_DEN
    safe = jnp.where(pos, den + eps, 1.0)
    c = lax.stop_gradient(1.0 / safe)  # a common factor: keeps the backward O(1 / den), not O(1 / den^2)
    # 0 * num: 0 for a finite num, NaN for a non-finite one; NaN den: NaN
    rest = jnp.where(jnp.isnan(den), jnp.nan, 0.0 * num)
    return jnp.where(pos, (num * c) / (safe * c), rest)


def _pad_len(x, axis: int, size: int, value=0.0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _noncausal(phi_q, phi_k, v1, log_scale):
    if log_scale is not None:
        top = lax.stop_gradient(jnp.max(log_scale, axis=1, keepdims=True))  # [B, 1, H]
        phi_k = phi_k * jnp.exp(log_scale - top)[..., None]
    kv = jnp.einsum("bshf,bshe->bhfe", phi_k, v1)
    return jnp.einsum("bthf,bhfe->bthe", phi_q, kv)


def _causal(phi_q, phi_k, v1, log_scale, chunk: int):
    B, N, H, F = phi_q.shape
    E = v1.shape[-1]
    C = min(chunk, N)
    n = -(-N // C)
    L = n * C

    def chunks(x, value=0.0):  # [B, N, H, ...] -> [n, B, H, C, ...]
        x = _pad_len(x, 1, L, value)
        x = x.reshape((B, n, C) + x.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)

    qc, kc, vc = chunks(phi_q), chunks(phi_k), chunks(v1)
    tri = jnp.tril(jnp.ones((C, C), bool))
    if log_scale is None:

        def step(state, xs):
            q, k, v = xs
            s = jnp.where(tri, jnp.einsum("bhif,bhjf->bhij", q, k), 0.0)  # future NaN: where, after the product
            out = jnp.einsum("bhij,bhje->bhie", s, v) + jnp.einsum("bhif,bhfe->bhie", q, state)
            return state + jnp.einsum("bhjf,bhje->bhfe", k, v), out

        init = jnp.zeros((B, H, F, E), jnp.float32)
        _, out = lax.scan(step, init, (qc, kc, vc))
    else:
        lc = chunks(log_scale, _NEG)  # [n, B, H, C]

        def step(carry, xs):
            state, top = carry  # state at scale exp(-top); top [B, H]
            q, k, v, l = xs
            ls = lax.stop_gradient(l)
            row_top = jnp.maximum(top[..., None], lax.cummax(ls, axis=2))  # [B, H, C]
            # exponent l_j - row_top_i <= 0 for j <= i; masked before exp (no inf, no NaN grad)
            w = jnp.exp(jnp.where(tri, l[..., None, :] - row_top[..., :, None], _NEG))
            s = jnp.where(tri, jnp.einsum("bhif,bhjf->bhij", q, k) * w, 0.0)  # where after the product
            inter = jnp.einsum("bhif,bhfe->bhie", q, state) * jnp.exp(top[..., None] - row_top)[..., None]
            out = jnp.einsum("bhij,bhje->bhie", s, v) + inter
            new_top = jnp.maximum(top, jnp.max(ls, axis=2))
            kw = k * jnp.exp(l - new_top[..., None])[..., None]
            state = state * jnp.exp(top - new_top)[..., None, None] + jnp.einsum("bhjf,bhje->bhfe", kw, v)
            return (state, new_top), out

        init = (jnp.zeros((B, H, F, E), jnp.float32), jnp.full((B, H), _NEG, jnp.float32))
        _, out = lax.scan(step, init, (qc, kc, vc, lc))
    out = jnp.moveaxis(jnp.moveaxis(out, 3, 2), 0, 1).reshape(B, L, H, E)
    return out[:, :N]


def linear_attention(
    phi_q: Float[Array, "B T H F"],
    phi_k: Float[Array, "B S H F"],
    v: Float[Array, "B S H Dv"],
    *,
    causal: bool = False,
    kv_mask: Bool[Array, "B S"] | None = None,
    k_log_scale: Float[Array, "B S H"] | None = None,
    eps: float = 0.0,
    chunk_size: int = 64,
) -> Float[Array, "B T H Dv"]:
    """Normalised linear attention of feature maps; float32 output (see the module docstring).

    ``causal`` needs T == S. ``k_log_scale``: optional per-key log multiplier of phi(k); the
    denominator is then known only up to the engine's rescaling, so ``eps`` must be 0.
    """
    if causal and phi_q.shape[1] != phi_k.shape[1]:
        raise ValueError(f"causal linear attention needs T == S, got {phi_q.shape[1]} and {phi_k.shape[1]}")
    if k_log_scale is not None and eps != 0:
        raise ValueError("linear_attention: eps must be 0 with k_log_scale (the rescaled denominator has no fixed scale)")
    phi_q, phi_k, v = (x.astype(jnp.float32) for x in (phi_q, phi_k, v))
    if k_log_scale is not None:
        k_log_scale = k_log_scale.astype(jnp.float32)
    v, bad = split_nonfinite(v)  # a bad value poisons (NaN features) exactly who sees its key
    phi_k = jnp.where(bad[..., None], jnp.nan, phi_k)
    if kv_mask is not None:
        keep = kv_mask[:, :, None]
        phi_k = jnp.where(keep[..., None], phi_k, 0.0)
        v = jnp.where(keep[..., None], v, 0.0)
        if k_log_scale is not None:
            k_log_scale = jnp.where(keep, k_log_scale, _NEG)
    v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
    if causal:
        nd = _causal(phi_q, phi_k, v1, k_log_scale, chunk_size)
    else:
        nd = _noncausal(phi_q, phi_k, v1, k_log_scale)
    return normalise(nd[..., :-1], nd[..., -1:], eps)
