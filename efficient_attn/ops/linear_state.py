"""The recurrent state of causal linear attention: what ``linear``, ``performer`` and
``cosformer`` carry from one decoded token to the next.

Causal linear attention (``ops.linear_attention``) is an RNN (Katharopoulos et al. 2020,
"Transformers are RNNs", eq. 16-18). Per batch and head, with the value extended by a 1,

    S_t = S_{t-1} + phi(k_t) [v_t | 1]^T                    [F, Dv + 1]
    [num | den]_t = phi(q_t) S_t,     out_t = num / (den + eps)   (``normalise``: 0 when den <= 0)

so the state is one [F, Dv + 1] matrix, the same size at every position: the running sums of
phi(k) v^T (first Dv columns) and of phi(k) (the last column).

Per-key log scales (FAVOR+'s, see ``ops.linear_attention``): the true key feature is
phi(k_j) exp(l_j). The state is kept at the scale exp(-m), m the largest l seen so far
(``top``), and rescaled by exp(m_old - m_new) when a key raises it: every exponent is <= 0,
and since the output is a ratio the common scale cancels. Without log scales l = 0.

Functions: ``init_state`` (nothing seen), ``summarise`` (the state after a prompt, from all
its keys at once: one [T] contraction, the prefill's), ``write`` (add one key), ``read``
(num and den for one query), ``step`` (one token: write, then read).
Computation is float32. Masks: a padded prompt key (kv_mask False) contributes nothing
(``where``, not a product). A value row with a NaN or Inf entry makes its key's features NaN
(``split_nonfinite``), so the outputs that see it are NaN, as in the engine. The readable
reference is ``ops.reference.linear.linear_attention_recurrent`` (tests/ops/test_linear_state.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from efficient_attn.ops.linear_attention import NEG, normalise
from efficient_attn.ops.masks import split_nonfinite

__all__ = ["LinearState", "init_state", "summarise", "write", "read", "step"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["kv", "top"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LinearState:
    """kv ``[B, H, F, Dv + 1]``: sum_j exp(l_j - top) phi(k_j) [v_j | 1]^T; top ``[B, H]``."""

    kv: Float[Array, "B H F E"]
    top: Float[Array, "B H"]


def init_state(batch: int, heads: int, features: int, value_dim: int) -> LinearState:
    """Nothing seen: zero sums, no log scale yet."""
    return LinearState(
        kv=jnp.zeros((batch, heads, features, value_dim + 1), jnp.float32),
        top=jnp.full((batch, heads), NEG, jnp.float32),
    )


def _with_one(v: Float[Array, "... Dv"]) -> Float[Array, "... E"]:
    return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def _prepare(phi_k, v, log_scale):
    phi_k, v = phi_k.astype(jnp.float32), v.astype(jnp.float32)
    v, bad = split_nonfinite(v)
    phi_k = jnp.where(bad[..., None], jnp.nan, phi_k)
    scale = jnp.zeros(phi_k.shape[:-1], jnp.float32) if log_scale is None else log_scale.astype(jnp.float32)
    return phi_k, _with_one(v), scale


def summarise(
    phi_k: Float[Array, "B T H F"],
    v: Float[Array, "B T H Dv"],
    *,
    kv_mask: Bool[Array, "B T"] | None = None,
    k_log_scale: Float[Array, "B T H"] | None = None,
) -> LinearState:
    """The state after the tokens 0..T-1 (padded ones skipped), from an empty state."""
    phi_k, v1, scale = _prepare(phi_k, v, k_log_scale)
    if kv_mask is not None:
        keep = kv_mask[:, :, None]
        phi_k = jnp.where(keep[..., None], phi_k, 0.0)
        v1 = jnp.where(keep[..., None], v1, 0.0)
        scale = jnp.where(keep, scale, NEG)
    top = lax.stop_gradient(jnp.max(scale, axis=1))  # [B, H]
    weight = jnp.exp(scale - top[:, None])  # [B, T, H], <= 1
    kv = jnp.einsum("bthf,bthe->bhfe", phi_k * weight[..., None], v1)
    return LinearState(kv=kv, top=top)


def write(
    state: LinearState,
    phi_k_t: Float[Array, "B H F"],
    v_t: Float[Array, "B H Dv"],
    *,
    k_log_scale_t: Float[Array, "B H"] | None = None,
    keep_t: Bool[Array, " B"] | None = None,
) -> LinearState:
    """The sums after adding one token (``keep_t`` False: the row's token is skipped)."""
    phi_k_t, v1, scale = _prepare(phi_k_t, v_t, k_log_scale_t)
    if keep_t is not None:
        phi_k_t = jnp.where(keep_t[:, None, None], phi_k_t, 0.0)
        v1 = jnp.where(keep_t[:, None, None], v1, 0.0)
        scale = jnp.where(keep_t[:, None], scale, NEG)
    top = jnp.maximum(state.top, lax.stop_gradient(scale))
    old, new = jnp.exp(state.top - top), jnp.exp(scale - top)  # both <= 1
    kv = state.kv * old[..., None, None] + jnp.einsum("bhf,bhe->bhfe", phi_k_t * new[..., None], v1)
    return LinearState(kv=kv, top=top)


def read(state: LinearState, phi_q_t: Float[Array, "B H F"]) -> tuple[Float[Array, "B H Dv"], Float[Array, "B H 1"]]:
    """(num, den) = phi(q) S: the unnormalised output and its denominator (at scale exp(-top))."""
    nd = jnp.einsum("bhf,bhfe->bhe", phi_q_t.astype(jnp.float32), state.kv)
    return nd[..., :-1], nd[..., -1:]


def step(
    phi_q_t: Float[Array, "B H F"],
    phi_k_t: Float[Array, "B H F"],
    v_t: Float[Array, "B H Dv"],
    state: LinearState,
    *,
    k_log_scale_t: Float[Array, "B H"] | None = None,
    eps: float = 0.0,
) -> tuple[Float[Array, "B H Dv"], LinearState]:
    """One (real) token: add it to the sums, then read them with its query. float32."""
    state = write(state, phi_k_t, v_t, k_log_scale_t=k_log_scale_t)
    num, den = read(state, phi_q_t)
    return normalise(num, den, eps), state
