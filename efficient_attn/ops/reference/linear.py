"""Linear attention written out: the readable references of ``ops.linear_attention``.

The engine computes, for feature maps phi(Q) [B, T, H, F], phi(K) [B, S, H, F] and optional
per-key log scales l [B, S, H],

    W_ij  = phi(q_i) . phi(k_j) exp(l_j)            over the keys j visible to query i
    out_i = sum_j W_ij v_j / (sum_j W_ij + eps)     where sum_j W_ij > 0, else 0

(visible: j <= i when causal; kv_mask[j]; packed sequences: q_segment_ids[i] ==
kv_segment_ids[j]; a masked key's features, value and scale are replaced by zeros / "no
weight" with ``where``, so whatever they held cannot leak). Grouped-query heads: phi(K), V and
l may have Hkv heads dividing H; query head h reads kv head h // (H / Hkv), looked up here by
index (``_per_query_head``). Here the same quantity is computed three obviously-right ways, slowly:

``kernel_matrix_attention``    from an explicit [B, H, T, S] kernel matrix W (masked by zeroing)
``linear_attention_quadratic`` W = phi(Q) (phi(K) exp(l))^T formed explicitly, then the above
``linear_attention_recurrent`` causal, token by token with running sums (Katharopoulos et al.
                               2020, eq. 16-18):  S_t = S_{t-1} + exp(l_t) phi(k_t) v_t^T,
                               z_t = z_{t-1} + exp(l_t) phi(k_t),
                               out_t = phi(q_t) S_t / (phi(q_t) z_t + eps)
``linear_attention_log_features``  positive features given by their logs (FAVOR+'s
                               log phi): log W_ij = logsumexp_f (log phi(q_i)_f + log phi(k_j)_f),
                               out_i = softmax_j(log W_ij) V -- finite where exp would overflow

Log scales: exp(l) may overflow float32, and the ratio does not change when every key weight
of one query is multiplied by the same constant, so (exactly as the engine requires) ``eps``
must be 0 with log scales and the references divide query i's weights by exp(c_i), c_i the
largest log scale among the keys it sees (the recurrent form: the running max up to t). The
constant is held out of the gradient; the output does not depend on it.

O(T S) memory (the quadratic forms) or one ``lax.scan`` step per token (the recurrent form):
tests and small inputs only. Computation is float32. Non-finite inputs as in ``ops.masks``:
a masked key never matters, a NaN reaches exactly the rows that see it (a NaN denominator is
never read as "nothing visible"); gradients are finite for finite inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.ops.reference.softmax import masked_softmax_lse, weighted_values

__all__ = [
    "kernel_matrix_attention",
    "linear_attention_quadratic",
    "linear_attention_recurrent",
    "linear_attention_log_features",
]

_NO_KEY = -1e30  # log scale of "no key seen yet": finite, so differences of two of them are 0, not NaN


def _visible(B: int, T: int, S: int, causal: bool, kv_mask, q_segment_ids=None, kv_segment_ids=None
             ) -> Bool[Array, "B 1 T S"]:
    vis = jnp.ones((B, 1, T, S), bool)
    if causal:
        vis = vis & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])
    if kv_mask is not None:
        vis = vis & kv_mask[:, None, None, :]
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("linear attention reference: give both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None:  # packed sequences: pairs of one segment only
        vis = vis & (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
    return vis


def _per_query_head(x, num_heads: int):
    """[B, S, Hkv, ...] -> [B, S, H, ...]: query head h's copy of kv head h // (H / Hkv)."""
    Hkv = x.shape[2]
    if num_heads % Hkv:
        raise ValueError(f"linear attention reference: {Hkv} kv heads do not divide {num_heads} query heads")
    return jnp.take(x, jnp.arange(num_heads) // (num_heads // Hkv), axis=2)


def _check_log_scale(k_log_scale, eps: float) -> None:
    if k_log_scale is not None and eps != 0:
        raise ValueError("linear attention reference: eps must be 0 with k_log_scale (the rescaled denominator "
                         "has no fixed scale); pass eps=0.0")


def _ratio(num, den, eps: float):
    """num / (den + eps) where den > 0; 0 where den <= 0 (nothing visible, or cancellation of
    signed features), NaN there if num is not finite; NaN where den is NaN (the engine's rule)."""
    pos = den > 0
    rest = jnp.where(jnp.isnan(den), jnp.nan, 0.0 * num)  # 0 * num: NaN for a non-finite num
    return jnp.where(pos, num / jnp.where(pos, den + eps, 1.0), rest)


def kernel_matrix_attention(
    weights: Float[Array, "B H T S"],
    v: Float[Array, "B S Hkv Dv"],
    *,
    causal: bool = False,
    kv_mask: Bool[Array, "B S"] | None = None,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    eps: float = 0.0,
) -> Float[Array, "B T H Dv"]:
    """out_i = sum_j W_ij v_j / (sum_j W_ij + eps) over the visible j (0 where the sum is <= 0)."""
    B, H, T, S = weights.shape
    vis = _visible(B, T, S, causal, kv_mask, q_segment_ids, kv_segment_ids)
    w = jnp.where(vis, weights.astype(jnp.float32), 0.0)
    v = _per_query_head(v.astype(jnp.float32), H)
    if kv_mask is not None:
        v = jnp.where(kv_mask[:, :, None, None], v, 0.0)
    num = weighted_values(w, vis, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # NaN only where seen
    den = jnp.sum(w, axis=-1).transpose(0, 2, 1)[..., None]  # [B, T, H, 1]
    return _ratio(num, den, eps)


def linear_attention_quadratic(
    phi_q: Float[Array, "B T H F"],
    phi_k: Float[Array, "B S Hkv F"],
    v: Float[Array, "B S Hkv Dv"],
    *,
    causal: bool = False,
    kv_mask: Bool[Array, "B S"] | None = None,
    k_log_scale: Float[Array, "B S Hkv"] | None = None,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    eps: float = 0.0,
) -> Float[Array, "B T H Dv"]:
    """The engine's output with the [T, S] kernel matrix W = phi(Q) (phi(K) exp(l))^T formed explicitly."""
    _check_log_scale(k_log_scale, eps)
    phi_q, phi_k = phi_q.astype(jnp.float32), phi_k.astype(jnp.float32)
    B, T, H = phi_q.shape[:3]
    S = phi_k.shape[1]
    if kv_mask is not None:
        phi_k = jnp.where(kv_mask[:, :, None, None], phi_k, 0.0)
    w = jnp.einsum("bthf,bshf->bhts", phi_q, _per_query_head(phi_k, H))
    if k_log_scale is not None:
        vis = _visible(B, T, S, causal, kv_mask, q_segment_ids, kv_segment_ids)
        l = _per_query_head(k_log_scale.astype(jnp.float32), H)
        l = jnp.broadcast_to(l.transpose(0, 2, 1)[:, :, None, :], w.shape)  # [B, H, T, S]
        top = jnp.max(jnp.where(vis, l, -jnp.inf), axis=-1, keepdims=True)  # c_i: largest visible scale
        top = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
        w = w * jnp.where(vis, jnp.exp(jnp.where(vis, l - top, 0.0)), 0.0)
    return kernel_matrix_attention(w, v, causal=causal, kv_mask=kv_mask, q_segment_ids=q_segment_ids,
                                   kv_segment_ids=kv_segment_ids, eps=eps)


def linear_attention_recurrent(
    phi_q: Float[Array, "B T H F"],
    phi_k: Float[Array, "B T H F"],
    v: Float[Array, "B T H Dv"],
    *,
    kv_mask: Bool[Array, "B T"] | None = None,
    k_log_scale: Float[Array, "B T H"] | None = None,
    eps: float = 0.0,
) -> Float[Array, "B T H Dv"]:
    """Causal linear attention one token at a time: running sums S_t, z_t (module docstring).

    With log scales the sums are kept at the scale exp(-m_t), m_t = max_{j <= t} l_j, and
    rescaled by exp(m_{t-1} - m_t) when a key raises the max (the recurrent form of the
    engine's per-query constant).
    """
    _check_log_scale(k_log_scale, eps)
    if phi_q.shape[1] != phi_k.shape[1]:
        raise ValueError(f"linear_attention_recurrent is causal self-attention: T == S needed, got "
                         f"{phi_q.shape[1]} and {phi_k.shape[1]}")
    phi_q, phi_k, v = (x.astype(jnp.float32) for x in (phi_q, phi_k, v))
    B, T, H, F = phi_q.shape
    Dv = v.shape[-1]
    scale = jnp.zeros((B, T, H), jnp.float32) if k_log_scale is None else k_log_scale.astype(jnp.float32)
    keep = jnp.ones((B, T, 1), bool) if kv_mask is None else kv_mask[:, :, None]
    phi_k = jnp.where(keep[..., None], phi_k, 0.0)
    v = jnp.where(keep[..., None], v, 0.0)
    scale = jnp.where(keep, scale, _NO_KEY)
    bad = ~jnp.all(jnp.isfinite(v), axis=-1)  # [B, T, H]: a real key whose value holds a NaN or Inf
    v = jnp.where(bad[..., None], 0.0, v)

    def step(carry, xs):
        s, z, m, poisoned = carry  # [B, H, F, Dv], [B, H, F], [B, H]: sums at scale exp(-m); [B, H]
        q_t, k_t, v_t, l_t, bad_t = xs
        poisoned = poisoned | bad_t  # this query and every later one have seen a non-finite value
        m_new = jnp.maximum(m, lax.stop_gradient(l_t))
        old, new = jnp.exp(m - m_new), jnp.exp(l_t - m_new)  # both <= 1
        s = s * old[..., None, None] + new[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        z = z * old[..., None] + new[..., None] * k_t
        num = jnp.einsum("bhf,bhfe->bhe", q_t, s)
        den = jnp.einsum("bhf,bhf->bh", q_t, z)[..., None]
        out_t = jnp.where(poisoned[..., None], jnp.nan, _ratio(num, den, eps))
        return (s, z, m_new, poisoned), out_t

    time_major = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
    init = (jnp.zeros((B, H, F, Dv), jnp.float32), jnp.zeros((B, H, F), jnp.float32),
            jnp.full((B, H), _NO_KEY, jnp.float32), jnp.zeros((B, H), bool))
    _, out = lax.scan(step, init, tuple(time_major(x) for x in (phi_q, phi_k, v, scale, bad)))
    return jnp.moveaxis(out, 0, 1)


def linear_attention_log_features(
    log_phi_q: Float[Array, "B T H F"],
    log_phi_k: Float[Array, "B S H F"],
    v: Float[Array, "B S H Dv"],
    *,
    causal: bool = False,
    kv_mask: Bool[Array, "B S"] | None = None,
) -> Float[Array, "B T H Dv"]:
    """Linear attention of POSITIVE features given as logs (eps = 0), in log space throughout:

    W_ij = phi(q_i) . phi(k_j) = exp(logsumexp_f(log phi(q_i)_f + log phi(k_j)_f)), so
    out_i = sum_j W_ij v_j / sum_j W_ij is a softmax over j of those log kernels.
    """
    log_w = jax.nn.logsumexp(log_phi_q.astype(jnp.float32)[:, :, None] + log_phi_k.astype(jnp.float32)[:, None],
                             axis=-1)  # [B, T, S, H]
    log_w = log_w.transpose(0, 3, 1, 2)
    B, _, T, S = log_w.shape
    vis = _visible(B, T, S, causal, kv_mask)
    weights, _ = masked_softmax_lse(log_w, vis)
    v = v.astype(jnp.float32)
    if kv_mask is not None:
        v = jnp.where(kv_mask[:, :, None, None], v, 0.0)
    return weighted_values(weights, vis, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
