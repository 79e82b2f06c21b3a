"""Gated linear attention: ``retnet``, ``gla`` and ``mamba2`` on one chunked decay engine.

All three are linear attention with a decaying matrix state, per head,

    S_t = diag(a_t) S_{t-1} + k_t v_t^T,        o_t = scale * S_t^T q_t,

and differ only in the decay a_t (and what surrounds the recurrence). They hand q, k, v and
log a_t to ``ops.gated_linear`` (chunk-parallel: a ``lax.scan`` over chunks of C tokens,
C x C scores inside a chunk, decays in log space; see that module for the numerics). Time
O(N C d + N d^2), memory O(N d): no N x N matrix, forward or backward. The references the
engine is tested against are in ``ops/reference/gated_linear.py``.

retnet (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language
Models"). A fixed decay per head, gamma_h = 1 - 2^(-5-h) for heads h = 0..H-1 (the paper's
schedule), so the retention of key m at query n is gamma_h^(n-m). The paper's three forms
are all here: parallel, Retention(X) = (Q K^T (.) D) V with D_nm = gamma^(n-m) for n >= m
(``gated_linear_quadratic``, the reference), chunkwise (the engine, used on every call), and
recurrent (``ops.gated_linear.gated_linear_step``). Scale: q . k / sqrt(d), as the paper's
code scales the keys by d^(-1/2). Each head's output is normalised (the paper's GroupNorm
with one group per head: a LayerNorm over the head's d_v features, without affine
parameters -- the output projection that follows absorbs them); because that normalisation
is invariant to a per-(token, head) scale, the paper's extra numerical normalisations of the
parallel form (dividing D's rows by their root sum, dividing the scores by max(|row sum|, 1))
would change nothing but eps, and are left out: the float32 log-space engine does not need
them. Not included (they need the block's input x, which this interface does not receive):
the swish output gate swish(X W_G) and xPos; relative positions come from the model's
``position="rotary"`` if wanted. Parameter-free.

gla (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient
Training"). A data-dependent diagonal gate, one decay per key channel,

    alpha_t = sigmoid(x_t W_1 W_2 + b)^(1/tau),   log alpha_t = logsigmoid(x_t W_1 W_2 + b) / tau,

with a rank-16 bottleneck W_1 W_2 and tau = 16 (the paper's gate normaliser, which keeps
alpha near 1). Our interface passes the projected q, k, v, not x, so the gate is computed
from the key of each head, RMS-normalised: z_t = rms(k_t) W_1 W_2 + b, rms(k) = k / sqrt(mean(k^2)
+ eps), with learned ``nnx.Param`` W_1 [H, d, r], W_2 [H, r, d], b [H, d] (per head). The
paper's x is the block's pre-normalised input, whose scale the norm fixes; a key's scale is
learned and grows as retrieval sharpens, and an un-normalised gate input ties forgetting to
it (results/accuracy/cpu/NOTES.md: MQAR seed 0, 5.2% pooled reading k; 32.2% and 13.5% in two
runs reading rms(k), which left the 1/P plateau where the k-gated run did not). ``gate_input_norm=False`` gives the un-normalised form. Scale 1 / sqrt(d_k) on q. The output of each head is
normalised as in retnet (the paper's LayerNorm before its swish output gate; the gate
itself needs x and is not included).

mamba2 (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality"). The SSD mixer in its attention (dual) form: a
scalar data-dependent decay per head and token,

    dt_t = softplus(k_t . w_dt + dt_bias),   a_t = exp(-dt_t exp(A_log)),
    h_t = a_t h_{t-1} + B_t (dt_t x_t)^T,    y_t = h_t^T C_t + D x_t,

with C = q, B = k, X = v (so the engine's value is dt_t v_t) and no 1 / sqrt(d) scale, as in
SSD. Learned per head: ``A_log`` (A initialised uniform in [1, 16]), ``dt_bias`` (so that the
initial dt is log-uniform in [dt_min, dt_max] = [1e-3, 1e-1], through the inverse softplus),
``w_dt`` [H, d] (dt from the key: the interface gives no block input u to project) and the
skip ``D`` (initialised 1; ``skip=False`` drops it). Each head has its own B and C (Mamba-2's
ngroups = H; the paper's default shares one B, C across heads). Not included: the block's
in-projection, the short causal convolution, the SiLU on x, B, C, the z gate and the gated
RMSNorm -- those belong to the model around the mixer.

What the experiments need to know:
  * causal sequence models: ``Capabilities(bidirectional=False)``, so a call without
    ``Mask(causal=True)`` is refused with a CapabilityError; no cross attention.
  * ``kv_mask``: a padded position is an identity step of the recurrence (no write, no
    decay; its key and value are zeroed before any gate is computed, so NaN there cannot
    reach a parameter gradient). Its query still reads the state.
  * no budget knob: the state is d x d_v per head whatever the length; they never equal
    "full" (exact=False, no exact limit).
  * ``chunk_size`` is a speed knob only: every chunk size gives the same function.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

from efficient_attn.core import Attention, Capabilities, Dims, Mask, check_config, check_positive_int
from efficient_attn.ops.feature_norms import rms_normalise
from efficient_attn.ops.gated_linear import gated_linear_attention, gated_linear_step
from efficient_attn.registry import register

__all__ = [
    "RetNetConfig",
    "GLAConfig",
    "Mamba2Config",
    "RetNet",
    "GLA",
    "Mamba2",
    "retnet_log_decays",
    "head_norm",
]

_CAPS = Capabilities(
    causal=True, bidirectional=False, cross=False, kv_mask=True, exact=False, time="O(N)", memory="O(N)", decode=True
)


def head_norm(x: Float[Array, "B T H Dv"], eps: float) -> Float[Array, "B T H Dv"]:
    """LayerNorm over each head's features, no affine parameters (GroupNorm with a group per head)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def retnet_log_decays(num_heads: int) -> np.ndarray:
    """log gamma_h = log(1 - 2^(-5-h)), h = 0..H-1, computed in float64 (log1p keeps the tiny ones)."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads, dtype=np.float64))))


def _real_keys(k, v, kv_mask: Bool[Array, "B S"] | None):
    """Zero keys and values at padded positions before anything (a gate) is computed from them."""
    if kv_mask is None:
        return k, v
    keep = kv_mask[:, :, None, None]
    return jnp.where(keep, k, 0.0), jnp.where(keep, v, 0.0)


def _check_eps(name: str, eps) -> None:
    ok = isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0
    check_config(name, ok, f"norm_eps must be a finite float > 0, got {eps!r}")


# ---------------------------------------------------------------------------------- retnet


@dataclasses.dataclass(frozen=True)
class RetNetConfig:
    """chunk_size: engine chunk C (speed only). group_norm: normalise each head's output
    (the paper's GroupNorm). norm_eps: its epsilon."""

    chunk_size: int = 64
    group_norm: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self):
        check_positive_int("retnet", "chunk_size", self.chunk_size)
        check_config("retnet", isinstance(self.group_norm, bool), f"group_norm must be a bool, got {self.group_norm!r}")
        _check_eps("retnet", self.norm_eps)


@register(
    "retnet",
    config=RetNetConfig,
    family="gated",
    citation="Sun et al. 2023, Retentive Network: A Successor to Transformer for Large Language Models",
)
class RetNet(Attention):
    """Retention: causal linear attention with a fixed per-head decay 1 - 2^(-5-h); parameter-free."""

    capabilities = _CAPS

    def __init__(self, config: RetNetConfig, dims: Dims, *, rngs: nnx.Rngs):
        super().__init__(config, dims, rngs=rngs)

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        B, T, H, _ = q.shape
        log_decay = jnp.broadcast_to(jnp.asarray(retnet_log_decays(H), jnp.float32), (B, T, H))
        out = gated_linear_attention(
            q, k, v, log_decay, causal=mask.causal, kv_mask=mask.kv_mask, chunk=self.config.chunk_size
        )
        return head_norm(out, self.config.norm_eps) if self.config.group_norm else out

    # decoding: the [d, d_v] state per head (``gated_linear_step``), the same size everywhere

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        return _empty_state(self.dims, batch)

    def _norm(self, out):
        return head_norm(out, self.config.norm_eps) if self.config.group_norm else out

    def _prefill(self, q, k, v, mask: Mask, state):
        B, T, H, _ = q.shape
        log_decay = jnp.broadcast_to(jnp.asarray(retnet_log_decays(H), jnp.float32), (B, T, H))
        out, s = gated_linear_attention(
            q, k, v, log_decay, causal=True, kv_mask=mask.kv_mask, chunk=self.config.chunk_size,
            output_final_state=True,
        )
        return self._norm(out), s

    def _step(self, q_t, k_t, v_t, state):
        B, H, _ = q_t.shape
        log_decay = jnp.broadcast_to(jnp.asarray(retnet_log_decays(H), jnp.float32), (B, H))
        out, s = gated_linear_step(q_t, k_t, v_t, log_decay, state.data)
        return self._norm(out), s


# ---------------------------------------------------------------------------------- gla


@dataclasses.dataclass(frozen=True)
class GLAConfig:
    """gate_rank: bottleneck r of the gate projection (paper 16). gate_temperature: tau in
    alpha = sigmoid(.)^(1/tau) (paper 16). chunk_size: engine chunk C (speed only; 8 by
    measurement: a diagonal gate's pairwise decays cost C x C x Dk per chunk, so the
    forward+backward at C = 8 ran 12-20x faster than at 64 on 2 CPU cores, for B=32 T=128 H=2
    D=32 and B=1 T=8K H=4 D=64 alike; the scalar-gate variants keep 64). output_norm: normalise
    each head's output (the paper's LayerNorm). norm_eps: its epsilon (and the gate input's).
    gate_input_norm: compute the gate from the RMS-normalised key (see the module docstring)."""

    gate_rank: int = 16
    gate_temperature: float = 16.0
    chunk_size: int = 8
    output_norm: bool = True
    norm_eps: float = 1e-6
    gate_input_norm: bool = True

    def __post_init__(self):
        check_positive_int("gla", "gate_rank", self.gate_rank)
        tau = self.gate_temperature
        ok = isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0
        check_config("gla", ok, f"gate_temperature must be a finite float > 0, got {tau!r}")
        check_positive_int("gla", "chunk_size", self.chunk_size)
        check_config("gla", isinstance(self.output_norm, bool), f"output_norm must be a bool, got {self.output_norm!r}")
        check_config("gla", isinstance(self.gate_input_norm, bool),
                     f"gate_input_norm must be a bool, got {self.gate_input_norm!r}")
        _check_eps("gla", self.norm_eps)


@register(
    "gla",
    config=GLAConfig,
    family="gated",
    citation="Yang et al. 2024, Gated Linear Attention Transformers with Hardware-Efficient Training",
)
class GLA(Attention):
    """Gated linear attention: a data-dependent per-channel decay from a low-rank gate on the key."""

    capabilities = _CAPS

    def __init__(self, config: GLAConfig, dims: Dims, *, rngs: nnx.Rngs):
        super().__init__(config, dims, rngs=rngs)
        H, D, r = dims.num_heads, dims.head_dim, config.gate_rank
        self.gate_down = nnx.Param(jax.random.normal(rngs.params(), (H, D, r), jnp.float32) / math.sqrt(D))
        self.gate_up = nnx.Param(jax.random.normal(rngs.params(), (H, r, D), jnp.float32) / math.sqrt(r))
        self.gate_bias = nnx.Param(jnp.zeros((H, D), jnp.float32))

    def log_gate(self, k: Float[Array, "B T H D"]) -> Float[Array, "B T H D"]:
        """log alpha_t = logsigmoid(rms(k_t) W_1 W_2 + b) / tau, per head and key channel (<= 0)."""
        x = k.astype(jnp.float32)
        if self.config.gate_input_norm:
            x = rms_normalise(x, self.config.norm_eps)
        z = jnp.einsum("bthd,hdr->bthr", x, self.gate_down[...])
        z = jnp.einsum("bthr,hre->bthe", z, self.gate_up[...]) + self.gate_bias[...]
        return jax.nn.log_sigmoid(z) / self.config.gate_temperature

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        k, v = _real_keys(k, v, mask.kv_mask)
        out = gated_linear_attention(
            q, k, v, self.log_gate(k), causal=mask.causal, kv_mask=mask.kv_mask, chunk=self.config.chunk_size
        )
        return head_norm(out, self.config.norm_eps) if self.config.output_norm else out

    # decoding: the [d, d_v] state per head; the gate of a step comes from its own key

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        return _empty_state(self.dims, batch)

    def _norm(self, out):
        return head_norm(out, self.config.norm_eps) if self.config.output_norm else out

    def _prefill(self, q, k, v, mask: Mask, state):
        k, v = _real_keys(k, v, mask.kv_mask)
        out, s = gated_linear_attention(
            q, k, v, self.log_gate(k), causal=True, kv_mask=mask.kv_mask, chunk=self.config.chunk_size,
            output_final_state=True,
        )
        return self._norm(out), s

    def _step(self, q_t, k_t, v_t, state):
        out, s = gated_linear_step(q_t, k_t, v_t, self.log_gate(k_t[:, None])[:, 0], state.data)
        return self._norm(out), s


# ---------------------------------------------------------------------------------- mamba2


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """dt_min, dt_max: range of the initial step sizes (log-uniform, Mamba-2's 1e-3, 1e-1).
    a_min, a_max: range of the initial A = exp(A_log) (uniform, Mamba-2's [1, 16]).
    skip: add the D x_t skip term. chunk_size: engine chunk C (speed only)."""

    dt_min: float = 1e-3
    dt_max: float = 1e-1
    a_min: float = 1.0
    a_max: float = 16.0
    skip: bool = True
    chunk_size: int = 64

    def __post_init__(self):
        for field in ("dt_min", "dt_max", "a_min", "a_max"):
            x = getattr(self, field)
            ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
            check_config("mamba2", ok, f"{field} must be a finite float > 0, got {x!r}")
        check_config("mamba2", self.dt_min <= self.dt_max, f"dt_min={self.dt_min} must be <= dt_max={self.dt_max}")
        check_config("mamba2", self.a_min <= self.a_max, f"a_min={self.a_min} must be <= a_max={self.a_max}")
        check_config("mamba2", isinstance(self.skip, bool), f"skip must be a bool, got {self.skip!r}")
        check_positive_int("mamba2", "chunk_size", self.chunk_size)


@register(
    "mamba2",
    config=Mamba2Config,
    family="gated",
    citation="Dao & Gu 2024, Transformers are SSMs: Generalized Models and Efficient Algorithms Through "
    "Structured State Space Duality",
)
class Mamba2(Attention):
    """Mamba-2's SSD mixer in attention form: C = q, B = k, X = v, a data-dependent scalar decay."""

    capabilities = _CAPS

    def __init__(self, config: Mamba2Config, dims: Dims, *, rngs: nnx.Rngs):
        super().__init__(config, dims, rngs=rngs)
        H, D = dims.num_heads, dims.head_dim
        u = jax.random.uniform(rngs.params(), (H,), jnp.float32)
        dt = jnp.exp(math.log(config.dt_min) + u * (math.log(config.dt_max) - math.log(config.dt_min)))
        self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))  # softplus(dt_bias) = dt
        a = config.a_min + jax.random.uniform(rngs.params(), (H,), jnp.float32) * (config.a_max - config.a_min)
        self.A_log = nnx.Param(jnp.log(a))
        self.w_dt = nnx.Param(jax.random.normal(rngs.params(), (H, D), jnp.float32) / math.sqrt(D))
        if config.skip:
            self.D = nnx.Param(jnp.ones((H,), jnp.float32))

    def step_sizes(self, k: Float[Array, "B T H D"]) -> Float[Array, "B T H"]:
        """dt_t = softplus(k_t . w_dt + dt_bias) > 0, per head."""
        return jax.nn.softplus(jnp.einsum("bthd,hd->bth", k.astype(jnp.float32), self.w_dt[...]) + self.dt_bias[...])

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        k, v = _real_keys(k, v, mask.kv_mask)
        x = v.astype(jnp.float32)
        dt = self.step_sizes(k)
        log_decay = -dt * jnp.exp(self.A_log[...])
        y = gated_linear_attention(
            q, k, x * dt[..., None], log_decay, causal=mask.causal, kv_mask=mask.kv_mask,
            chunk=self.config.chunk_size, scale=1.0,
        )
        if self.config.skip:
            y = y + self.D[...][:, None] * x
        return y

    # decoding: the [d, d_v] SSM state h per head; dt of a step from its own key

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        return _empty_state(self.dims, batch)

    def _prefill(self, q, k, v, mask: Mask, state):
        k, v = _real_keys(k, v, mask.kv_mask)
        x = v.astype(jnp.float32)
        dt = self.step_sizes(k)
        y, s = gated_linear_attention(
            q, k, x * dt[..., None], -dt * jnp.exp(self.A_log[...]), causal=True, kv_mask=mask.kv_mask,
            chunk=self.config.chunk_size, scale=1.0, output_final_state=True,
        )
        return (y + self.D[...][:, None] * x if self.config.skip else y), s

    def _step(self, q_t, k_t, v_t, state):
        x = v_t.astype(jnp.float32)
        dt = self.step_sizes(k_t[:, None])[:, 0]  # [B, H]
        y, s = gated_linear_step(q_t, k_t, x * dt[..., None], -dt * jnp.exp(self.A_log[...]), state.data, scale=1.0)
        return (y + self.D[...][:, None] * x if self.config.skip else y), s


def _empty_state(dims: Dims, batch: int) -> Float[Array, "B H Dk Dv"]:
    """The recurrent state before any token: zeros, float32 whatever the input dtype."""
    return jnp.zeros((batch, dims.num_heads, dims.head_dim, dims.head_dim), jnp.float32)
