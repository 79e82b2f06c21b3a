"""The delta rule: ``deltanet`` and ``gated_deltanet`` on the chunked WY engine (``ops.delta_rule``).

A linear-attention state S_t [d, d] per head is a fast-weight memory: linear attention only
adds to it (S_t = S_{t-1} + v_t k_t^T), so a key written twice holds the sum of both values
and old associations are never removed. The delta rule first reads what S holds at k_t and
writes the difference, with a learned strength beta_t in (0, 1):

    S_t = S_{t-1} - beta_t (S_{t-1} k_t - v_t) k_t^T = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,
    o_t = S_t q_t

one step of gradient descent on ||S k_t - v_t||^2 / 2 (Schlag, Irie & Schmidhuber 2021,
"Linear Transformers Are Secretly Fast Weight Programmers", ICML). With ||k_t|| = 1 and
beta_t = 1 the value stored along k_t is replaced exactly.

deltanet (Yang, Wang, Zhang, Shen & Kim 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length", NeurIPS): keys and queries L2-normalised per head, beta_t =
sigmoid(w_beta . k_t + b) per head, trained in parallel over the sequence by the chunked
WY / UT form (see ``ops.delta_rule``).

gated_deltanet (Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with
Delta Rule", ICLR): a scalar data-dependent forget gate alpha_t in (0, 1] before the write,

    S_t = S_{t-1} (alpha_t (I - beta_t k_t k_t^T)) + beta_t v_t k_t^T,
    alpha_t = exp(-exp(A_log) softplus(w_alpha . k_t + dt_bias))          (Mamba-2's gate)

with A = exp(A_log) drawn from U(a_min, a_max) and softplus(dt_bias) log-uniform in
[dt_min, dt_max] at initialisation, as Mamba-2 does. alpha -> 0 clears the memory at once
(a context switch); alpha = 1 is DeltaNet.

What experiments need to know:
- Causal only: a recurrence runs forward (capabilities bidirectional=False; a call without
  ``Mask(causal=True)`` raises a CapabilityError saying so). No cross attention.
- The gates are computed from the key: our interface passes q, k, v only, where the papers
  project beta_t and alpha_t from the layer input x_t by their own weights. k_t = W_k x_t is a
  linear image of x_t, so these are the papers' gates restricted to read x through W_k. The
  gates read the raw key; the state sees the normalised one.
- Left out, because they belong to the layer around the attention and not to the attention:
  the short causal convolutions on q, k, v, the output gate and the output RMSNorm of the
  papers' blocks.
- ``scale`` (default 1): o_t = scale * S_t q_t with unit q and k, so a query equal to a key
  written with beta = 1 reads back exactly that value, at the magnitude of the values (as
  softmax outputs are). fla's kernels default to d^-1/2, followed there by the output norm.
- No budget knob: the state is d x d per head (fixed by head_dim); ``chunk_size`` changes
  speed and memory, not the result (up to rounding). Not an approximation of softmax, so no
  exact limit. The gate projections are learned parameters (random at initialisation).
- Cost: time O(N (c d + d^2)), memory O(N (c + d)) forward and backward, c = chunk_size;
  computed in float32 whatever the input dtype.
- A padded key (``kv_mask`` False) is an identity step: nothing written, nothing forgotten;
  the query at that position still reads the memory. A query that sees no real key reads the
  zero initial state: zeros.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from efficient_attn.core import Attention, Capabilities, Dims, Mask, check_config, check_positive_int
from efficient_attn.ops.delta_rule import delta_rule_attention, delta_rule_step
from efficient_attn.ops.feature_norms import l2_normalise
from efficient_attn.registry import register

__all__ = ["DeltaNetConfig", "GatedDeltaNetConfig", "DeltaNet", "GatedDeltaNet"]

_CAPS = Capabilities(
    causal=True,
    bidirectional=False,
    cross=False,
    kv_mask=True,
    exact=False,
    time="O(N (c d + d^2))",
    memory="O(N (c + d))", decode=True,
)


def _positive_float(variant: str, field: str, value) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    check_config(variant, ok, f"{field} must be a finite number > 0, got {value!r}")


def _check_common(variant: str, cfg) -> None:
    check_positive_int(variant, "chunk_size", cfg.chunk_size)
    _positive_float(variant, "scale", cfg.scale)
    _positive_float(variant, "norm_eps", cfg.norm_eps)


def _real_tokens(q, k, v, mask: Mask):
    """float32, with padded keys and values zeroed (``where``): a NaN there reaches neither the
    gate projections nor their parameter gradients."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if mask.kv_mask is not None:
        real = mask.kv_mask[:, :, None, None]
        k, v = jnp.where(real, k, 0.0), jnp.where(real, v, 0.0)
    return q, k, v


def _per_head(k: Float[Array, "B T H D"], w: Float[Array, "H D"], b: Float[Array, "H"]) -> Float[Array, "B T H"]:
    return jnp.einsum("bthd,hd->bth", k, w) + b


# -------------------------------------------------------------------------------- deltanet


@dataclasses.dataclass(frozen=True)
class DeltaNetConfig:
    """chunk_size: positions per chunk of the WY engine (speed/memory only).
    scale: multiplies the (unit) queries. norm_eps: inside the L2 normalisation of q and k."""

    chunk_size: int = 64
    scale: float = 1.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        _check_common("deltanet", self)


class _BetaGate(nnx.Module):
    """beta_t = sigmoid(w . k_t + b) per head; w ~ N(0, 1/d), b = 0 (beta = 1/2 on average)."""

    def __init__(self, dims: Dims, rngs: nnx.Rngs):
        d = dims.head_dim
        self.w = nnx.Param(jax.random.normal(rngs.params(), (dims.num_heads, d), jnp.float32) / math.sqrt(d))
        self.b = nnx.Param(jnp.zeros((dims.num_heads,), jnp.float32))

    def __call__(self, k: Float[Array, "B T H D"]) -> Float[Array, "B T H"]:
        return jax.nn.sigmoid(_per_head(k, self.w[...], self.b[...]))


@register(
    "deltanet",
    config=DeltaNetConfig,
    family="delta",
    citation="Yang et al. 2024, Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
)
class DeltaNet(Attention):
    """DeltaNet: a d x d fast-weight memory per head updated by the delta rule (causal only)."""

    capabilities = _CAPS

    def __init__(self, config: DeltaNetConfig, dims: Dims, *, rngs: nnx.Rngs):
        super().__init__(config, dims, rngs=rngs)
        self.beta = _BetaGate(dims, rngs)

    def gates(self, k: Float[Array, "B T H D"]) -> tuple[Float[Array, "B T H"], None]:
        """(beta, log_decay) from the raw keys; DeltaNet forgets nothing (None)."""
        return self.beta(k.astype(jnp.float32)), None

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        return _delta_attend(self, q, k, v, mask)

    # decoding: the [d, d] fast-weight memory per head (``delta_rule_step``)

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        d = self.dims
        return jnp.zeros((batch, d.num_heads, d.head_dim, d.head_dim), jnp.float32)

    def _prefill(self, q, k, v, mask: Mask, state):
        return _delta_prefill(self, q, k, v, mask)

    def _step(self, q_t, k_t, v_t, state):
        return _delta_step(self, q_t, k_t, v_t, state.data)


# -------------------------------------------------------------------------- gated_deltanet


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig:
    """DeltaNet's fields, plus the initialisation of the gate (Mamba-2's):
    A = exp(A_log) ~ U(a_min, a_max); softplus(dt_bias) log-uniform in [dt_min, dt_max]."""

    chunk_size: int = 64
    scale: float = 1.0
    norm_eps: float = 1e-6
    a_min: float = 1.0
    a_max: float = 16.0
    dt_min: float = 1e-3
    dt_max: float = 0.1

    def __post_init__(self):
        name = "gated_deltanet"
        _check_common(name, self)
        for field in ("a_min", "a_max", "dt_min", "dt_max"):
            _positive_float(name, field, getattr(self, field))
        check_config(name, self.a_min <= self.a_max, f"a_min ({self.a_min}) must be <= a_max ({self.a_max})")
        check_config(name, self.dt_min <= self.dt_max, f"dt_min ({self.dt_min}) must be <= dt_max ({self.dt_max})")


def _inverse_softplus(y: Float[Array, "..."]) -> Float[Array, "..."]:
    return y + jnp.log(-jnp.expm1(-y))  # softplus(x) = y  <=>  x = log(e^y - 1)


class _ForgetGate(nnx.Module):
    """log alpha_t = -exp(A_log) softplus(w . k_t + dt_bias) per head (<= 0: alpha in (0, 1])."""

    def __init__(self, config: GatedDeltaNetConfig, dims: Dims, rngs: nnx.Rngs):
        H, d = dims.num_heads, dims.head_dim
        k_w, k_a, k_dt = jax.random.split(rngs.params(), 3)
        self.w = nnx.Param(jax.random.normal(k_w, (H, d), jnp.float32) / math.sqrt(d))
        a = jax.random.uniform(k_a, (H,), jnp.float32, config.a_min, config.a_max)
        self.A_log = nnx.Param(jnp.log(a))
        lo, hi = math.log(config.dt_min), math.log(config.dt_max)
        dt = jnp.exp(jax.random.uniform(k_dt, (H,), jnp.float32, lo, hi))
        self.dt_bias = nnx.Param(_inverse_softplus(dt))

    def __call__(self, k: Float[Array, "B T H D"]) -> Float[Array, "B T H"]:
        dt = jax.nn.softplus(_per_head(k, self.w[...], self.dt_bias[...]))
        return -jnp.exp(self.A_log[...]) * dt


@register(
    "gated_deltanet",
    config=GatedDeltaNetConfig,
    family="delta",
    citation="Yang, Kautz & Hatamizadeh 2025, Gated Delta Networks: Improving Mamba2 with Delta Rule",
)
class GatedDeltaNet(Attention):
    """Gated DeltaNet: the delta rule with a Mamba-2 style scalar forget gate (causal only)."""

    capabilities = _CAPS

    def __init__(self, config: GatedDeltaNetConfig, dims: Dims, *, rngs: nnx.Rngs):
        super().__init__(config, dims, rngs=rngs)
        self.beta = _BetaGate(dims, rngs)
        self.forget = _ForgetGate(config, dims, rngs)

    def gates(self, k: Float[Array, "B T H D"]) -> tuple[Float[Array, "B T H"], Float[Array, "B T H"]]:
        """(beta, log_decay = log alpha) from the raw keys."""
        k = k.astype(jnp.float32)
        return self.beta(k), self.forget(k)

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        return _delta_attend(self, q, k, v, mask)

    # decoding: the [d, d] fast-weight memory per head, forgotten by alpha_t at each step

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        d = self.dims
        return jnp.zeros((batch, d.num_heads, d.head_dim, d.head_dim), jnp.float32)

    def _prefill(self, q, k, v, mask: Mask, state):
        return _delta_prefill(self, q, k, v, mask)

    def _step(self, q_t, k_t, v_t, state):
        return _delta_step(self, q_t, k_t, v_t, state.data)


def _delta_attend(module, q, k, v, mask: Mask):
    """Gates from the raw keys, L2-normalised q and k, then the chunked delta rule."""
    cfg = module.config
    q, k, v = _real_tokens(q, k, v, mask)
    beta, log_decay = module.gates(k)
    return delta_rule_attention(
        l2_normalise(q, cfg.norm_eps),
        l2_normalise(k, cfg.norm_eps),
        v,
        beta,
        log_decay,
        kv_mask=mask.kv_mask,
        chunk=cfg.chunk_size,
        scale=cfg.scale,
    )


def _delta_prefill(module, q, k, v, mask: Mask):
    """``_delta_attend`` with the memory after the prompt: (out, state [B, H, d, d])."""
    cfg = module.config
    q, k, v = _real_tokens(q, k, v, mask)
    beta, log_decay = module.gates(k)
    return delta_rule_attention(
        l2_normalise(q, cfg.norm_eps), l2_normalise(k, cfg.norm_eps), v, beta, log_decay,
        kv_mask=mask.kv_mask, chunk=cfg.chunk_size, scale=cfg.scale, output_final_state=True,
    )


def _delta_step(module, q_t, k_t, v_t, memory):
    """One token of the delta rule, gates from its own raw key: (out [B, H, d], memory)."""
    cfg = module.config
    q_t, k_t, v_t = (x.astype(jnp.float32) for x in (q_t, k_t, v_t))
    beta, log_decay = module.gates(k_t[:, None])
    return delta_rule_step(
        l2_normalise(q_t, cfg.norm_eps), l2_normalise(k_t, cfg.norm_eps), v_t, beta[:, 0],
        None if log_decay is None else log_decay[:, 0], memory, scale=cfg.scale,
    )
