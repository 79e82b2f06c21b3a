"""Kernel (linear) attention: ``linear``, ``performer`` and ``cosformer`` on one engine.

Each variant replaces exp(q . k / sqrt(d)) by a product of feature maps phi(q) . phi(k) and
hands phi(Q), phi(K), V to ``ops.linear_attention`` (reassociation when non-causal,
chunk-parallel prefix states when causal; see that module for masks and numerics). Time
O(N F d), memory O(N F) for F features: no T x S matrix is ever formed.

linear (Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers
with Linear Attention", ICML). phi(x) = elu(x) + 1 (positive, F = d). Not an approximation
of softmax: a different similarity. ``eps`` = 1e-6 is added to the denominator as in LRA's
and the paper's code.

performer (Choromanski et al. 2021, "Rethinking Attention with Performers", ICLR; FAVOR+).
Positive orthogonal random features estimate the softmax kernel without bias:

    x' = x / d^(1/4)  (q and k),    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),
    E_W[phi(q) . phi(k)] = exp(q . k / sqrt(d))   when every row w_i ~ N(0, I_d).

W [m, d] is drawn in blocks of d rows: each block is the orthogonal factor of the QR of a
d x d Gaussian (sign-corrected, so it is Haar distributed), and row i is rescaled to the norm
of an independent d-dim Gaussian vector (chi(d) distributed). Each row is then marginally
N(0, I_d), so the estimator stays unbiased, while rows in a block are exactly orthogonal
(lower variance). The output is a ratio of two such estimates: consistent, not unbiased, and
never exact (capabilities exact=False). ``num_features`` m = 256 as in LRA.

Stabilisation that does not bias the normalised output: the log-features l = W x' - |x'|^2/2
- log(m)/2 are shifted before exp, with the shifts under ``stop_gradient``:
  * query i: by max_f l_i,f (its own max). Both num_i and den_i are scaled by the same
    exp(-shift_i), so out_i is unchanged; it depends on query i only.
  * key j: phi(k_j) = exp(l_j - max_f l_j,f) <= 1 is passed with the log scale max_f l_j,f,
    and the engine rescales all keys by exp(scale_j - M) with M the largest scale among the
    keys visible to the query (see ``ops.linear_attention``): a common factor, so it cancels
    too, and causal outputs stay independent of later keys.
No constant is added to the features (the original code adds 1e-6, a small bias). After the
shifts the largest query feature and the largest visible key feature are exactly 1; a query
whose every product phi(q) . phi(k) still underflows gets den = 0, hence zeros, never NaN.

``redraw`` (LRA: redrawn): True draws a fresh W on every call from the ``nnx.Rngs`` stream
kept by the module (seeded at construction from the ``rngs`` passed in); each draw advances
that stream, a state update. Called eagerly or through ``nnx.jit`` / ``nnx.grad`` the update
persists and every call gets a new W. In a functional loop (``nnx.split`` once, then
``nnx.merge`` inside ``jax.jit``) the update lives only inside the traced copy: W changes
between steps only if the caller returns the non-Param state (``nnx.state(merged)``) and
passes it to the next step; otherwise every step reuses one W, which is then simply
redraw=False. Where the stream cannot be advanced at all (a ``jax.jit`` closing over
variables created outside it) the key the advancing call would use is drawn without
advancing. False draws W once at construction and stores it as a non-trainable
``RandomFeatures`` variable.

cosformer (Qin et al. 2022, "cosFormer: Rethinking Softmax in Attention", ICLR). ReLU
features with a cosine re-weighting of position distance,

    s(i, j) = relu(q_i) . relu(k_j) cos(pi/2 (i - j) / M),

decomposed exactly (cos(a - b) = cos a cos b + sin a sin b) into features of width 2d:
phi(q_i) = [relu(q_i) sin(a_i), relu(q_i) cos(a_i)] with a_i = pi i / (2M), and the same for
k_j, so the engine stays linear. M = max(T, S) of the call, with positions 1..T and 1..S,
exactly as the authors' released code does; the paper needs M >= the sequence length so
that |i - j| < M and every weight cos(.) > 0. Cross attention (T != S) is allowed as in
that code (positions of both sequences are counted from their start; the paper reports
cross-attention results). ``eps`` = 1e-6 as in the released code, which clamps the
denominator at eps; here it is added (the engine's rule), which differs by at most 1e-6
relative for any denominator >= 1, and a zero denominator gives zeros instead of num/eps.

Non-finite inputs (all three): a query or real key with a NaN or Inf entry is made all NaN
before its feature map, so the rows it reaches are NaN (never the 0 that elu(-inf) + 1 or
relu(-inf) would give); masked keys are zeroed before the feature map. A finite key so
large that |x'|^2 overflows float32 (|k| of about 1e19) has NaN FAVOR+ features: the rows
that see it are NaN rather than its softmax weight of 1.

Grouped-query heads and packed sequences (all three: capabilities ``gqa`` and ``segments``).
The feature maps act on each head alone, so phi(K) has the Hkv heads of k, and the engine
keeps one state per kv head, read by its H / Hkv query heads (never a copy of k or v per query
head). Packed segments are the engine's (state reset at each segment start, chunk-parallel).
performer uses one W for the whole call, so a packed row equals each sequence run alone with
the same W. cosformer's re-weighting is positional: with packed segments the positions
restart at each segment's start and M is that segment's length (the larger of its query and
key counts), i.e. exactly what each sequence run alone gets (positions 1.. and M = its own
length); the in-segment weight cos(pi/2 (i - j) / M) stays positive.

Decoding (``init_state`` / ``prefill`` / ``step``): all three carry the running sums of
phi(k) [v | 1]^T, [F, Dv + 1] per kv head whatever the position (``ops.linear_state``); a step
writes its key once per kv head and each query head reads its kv head's sums.
performer draws its W once per decoded sequence, in ``init_state`` (a forward call with
``redraw`` draws one per call), and keeps it in the state. cosformer needs a step's position
i in a_i = pi i / (2M): it is the state's position; M is the state's ``max_len`` (the forward
takes its call's length), so a decoded sequence equals the causal forward over max_len tokens.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import errors as flax_errors
from flax import nnx
from jax import lax
from jaxtyping import Array, Float, Int

from efficient_attn.core import Attention, Capabilities, Dims, Mask, check_config, check_positive_int
from efficient_attn.ops import linear_state, masks
from efficient_attn.ops.linear_attention import linear_attention, normalise
from efficient_attn.ops.masks import hide_keys, poison_nonfinite_rows
from efficient_attn.registry import Budget, register

__all__ = [
    "LinearConfig",
    "PerformerConfig",
    "CosformerConfig",
    "LinearAttention",
    "Performer",
    "Cosformer",
    "RandomFeatures",
    "orthogonal_gaussian",
    "favor_log_features",
    "cosformer_features",
    "segment_angles",
]


class RandomFeatures(nnx.Variable):
    """A random projection drawn from ``rngs`` at construction; not a parameter, never trained."""


def _check_eps(name: str, eps) -> None:
    ok = isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0
    check_config(name, ok, f"eps must be a finite float >= 0, got {eps!r}")


def _mask_parts(mask: Mask):
    return mask.causal, mask.kv_mask


def _segments(mask: Mask) -> dict:
    """The packed-sequence ids as the engine's keyword arguments."""
    return {"q_segment_ids": mask.q_segment_ids, "kv_segment_ids": mask.kv_segment_ids}


def _grouped_step(phi_q_t, phi_k_t, v_t, sums: linear_state.LinearState, *, k_log_scale_t=None, eps: float = 0.0):
    """``linear_state.step`` for H query heads over sums of Hkv kv heads: the token's key is
    written once per kv head, and query head h reads kv head h // (H / Hkv)."""
    sums = linear_state.write(sums, phi_k_t, v_t, k_log_scale_t=k_log_scale_t)
    B, H, F = phi_q_t.shape
    Hkv = sums.kv.shape[1]
    q = phi_q_t.astype(jnp.float32).reshape(B, Hkv, H // Hkv, F)
    nd = jnp.einsum("bkgf,bkfe->bkge", q, sums.kv).reshape(B, H, -1)
    return normalise(nd[..., :-1], nd[..., -1:], eps), sums


def _real_keys(k: Float[Array, "B S H D"], kv_mask) -> Float[Array, "B S H D"]:
    """Masked keys zeroed BEFORE the feature map: the engine zeroes their features too, but
    the feature map's own gradient at a NaN or Inf key would be NaN (0 * phi'(NaN)). A real
    key with a NaN or Inf entry becomes all NaN, so that it poisons who sees it even where
    phi would map it to a finite feature (elu(-inf) + 1 = 0, relu(-inf) = 0)."""
    return poison_nonfinite_rows(hide_keys(k, kv_mask))


# ---------------------------------------------------------------------------------- linear


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    """eps: added to the denominator (LRA: 1e-6). chunk_size: causal chunk length C."""

    eps: float = 1e-6
    chunk_size: int = 64

    def __post_init__(self):
        _check_eps("linear", self.eps)
        check_positive_int("linear", "chunk_size", self.chunk_size)


@register(
    "linear",
    config=LinearConfig,
    family="kernel",
    citation="Katharopoulos et al. 2020, Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
)
class LinearAttention(Attention):
    """Linear attention with the elu(x) + 1 feature map; O(N d^2) time, O(N d) memory."""

    capabilities = Capabilities(causal=True, cross=True, kv_mask=True, exact=False, time="O(N d^2)", memory="O(N d)",
                                gqa=True, segments=True, decode=True)

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S Hkv D"],
        v: Float[Array, "B S Hkv Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        causal, kv_mask = _mask_parts(mask)
        phi_q = jax.nn.elu(poison_nonfinite_rows(q).astype(jnp.float32)) + 1.0
        phi_k = jax.nn.elu(_real_keys(k, kv_mask).astype(jnp.float32)) + 1.0
        return linear_attention(
            phi_q, phi_k, v, causal=causal, kv_mask=kv_mask, eps=self.config.eps, chunk_size=self.config.chunk_size,
            **_segments(mask),
        )

    # decoding: the running sums of phi(k) [v | 1]^T, [F, Dv + 1] per kv head at every position

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        d = self.dims
        return linear_state.init_state(batch, d.num_kv_heads, d.head_dim, d.head_dim)

    def _prefill(self, q, k, v, mask: Mask, state):
        phi_k = jax.nn.elu(masks.hide_keys(k, mask.kv_mask).astype(jnp.float32)) + 1.0
        return self.attend(q, k, v, mask), linear_state.summarise(phi_k, v, kv_mask=mask.kv_mask)

    def _step(self, q_t, k_t, v_t, state):
        phi_q, phi_k = (jax.nn.elu(x.astype(jnp.float32)) + 1.0 for x in (q_t, k_t))
        return _grouped_step(phi_q, phi_k, v_t, state.data, eps=self.config.eps)


# ------------------------------------------------------------------------------- performer


def _gram_schmidt_columns(g: Float[Array, "D D"]) -> Float[Array, "D D"]:
    """Q of g = Q R with diag(R) > 0 (Haar-distributed for Gaussian g), by Gram-Schmidt twice.

    Written with matmuls rather than ``jnp.linalg.qr``: LAPACK's QR called inside a jitted,
    vmapped training step on the CPU was seen to deadlock (Performer with redraw).
    """
    dim = g.shape[0]
    idx = jnp.arange(dim)

    def body(j, q):
        v = lax.dynamic_index_in_dim(g, j, axis=1, keepdims=False)
        basis = jnp.where((idx < j)[None, :], q, 0.0)
        v = v - basis @ (basis.T @ v)
        v = v - basis @ (basis.T @ v)  # re-orthogonalise: float32 loses orthogonality once
        return lax.dynamic_update_index_in_dim(q, v / jnp.linalg.norm(v), j, axis=1)

    return lax.fori_loop(0, dim, body, jnp.zeros_like(g))


def orthogonal_gaussian(key: jax.Array, num_features: int, dim: int) -> Float[Array, "M D"]:
    """[m, d] rows w_i, each marginally N(0, I_d), exactly orthogonal within blocks of d rows."""
    blocks = -(-num_features // dim)
    k_dirs, k_norms = jax.random.split(key)

    def block(k):
        g = jax.random.normal(k, (dim, dim), jnp.float32)
        return _gram_schmidt_columns(g).T  # orthonormal rows


    dirs = jax.vmap(block)(jax.random.split(k_dirs, blocks)).reshape(blocks * dim, dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(k_norms, (num_features, dim), jnp.float32), axis=1)
    return dirs * norms[:, None]


def favor_log_features(x: Float[Array, "B N H D"], w: Float[Array, "M D"]) -> Float[Array, "B N H M"]:
    """log phi(x) = W x' - |x'|^2 / 2 - log(m) / 2 with x' = x / d^(1/4) (unshifted, float32)."""
    d = x.shape[-1]
    m = w.shape[0]
    x = x.astype(jnp.float32) * d**-0.25
    proj = jnp.einsum("bnhd,md->bnhm", x, w.astype(jnp.float32))
    return proj - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True) - 0.5 * math.log(m)


@dataclasses.dataclass(frozen=True)
class PerformerConfig:
    """num_features m (LRA: 256); redraw W on every call (LRA: True); causal chunk length."""

    num_features: int = 256
    redraw: bool = True
    chunk_size: int = 64

    def __post_init__(self):
        check_positive_int("performer", "num_features", self.num_features)
        check_config("performer", isinstance(self.redraw, bool), f"redraw must be a bool, got {self.redraw!r}")
        check_positive_int("performer", "chunk_size", self.chunk_size)


@register(
    "performer",
    config=PerformerConfig,
    family="kernel",
    citation="Choromanski et al. 2021, Rethinking Attention with Performers",
    budget=Budget("num_features", (8, 16, 32, 64, 128, 256, 512)),
    pattern_setting={"num_features": 64},
)
class Performer(Attention):
    """FAVOR+: positive orthogonal random features for the softmax kernel; O(N m d) time."""

    capabilities = Capabilities(causal=True, cross=True, kv_mask=True, exact=False, time="O(N m d)", memory="O(N m)",
                                gqa=True, segments=True, decode=True)

    def __init__(self, config: PerformerConfig, dims: Dims, *, rngs: nnx.Rngs):
        super().__init__(config, dims, rngs=rngs)
        if config.redraw:
            self.rngs = nnx.Rngs(rngs.params())
        else:
            self.projection = RandomFeatures(orthogonal_gaussian(rngs.params(), config.num_features, dims.head_dim))

    def draw(self) -> Float[Array, "M D"]:
        """The projection W used by the next call (a fresh draw when ``redraw``)."""
        if not self.config.redraw:
            return self.projection[...]
        stream = self.rngs.default
        try:
            key = stream()  # advances the stream: the next call draws a new W
        except flax_errors.TraceContextError:
            # called inside a jax transform over state captured outside it (e.g. jax.jit of a
            # closure of nnx.merge): the stream cannot advance from here. Draw the key that the
            # advancing call would have drawn; the caller owns threading state back out.
            key = jax.random.fold_in(stream.key[...], stream.count[...])
        return orthogonal_gaussian(key, self.config.num_features, self.dims.head_dim)

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S Hkv D"],
        v: Float[Array, "B S Hkv Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        causal, kv_mask = _mask_parts(mask)
        w = self.draw()
        lq = favor_log_features(poison_nonfinite_rows(q), w)
        lk = favor_log_features(_real_keys(k, kv_mask), w)
        phi_q = jnp.exp(lq - lax.stop_gradient(jnp.max(lq, axis=-1, keepdims=True)))
        k_scale = lax.stop_gradient(jnp.max(lk, axis=-1))  # [B, S, H]
        phi_k = jnp.exp(lk - k_scale[..., None])
        return linear_attention(
            phi_q,
            phi_k,
            v,
            causal=causal,
            kv_mask=kv_mask,
            k_log_scale=k_scale,
            eps=0.0,
            chunk_size=self.config.chunk_size,
            **_segments(mask),
        )

    # decoding: one projection W per decoded sequence, drawn by init_state (a forward call
    # draws one per call) and kept in the state with the running sums; the sums are kept at
    # the scale of the largest key log-feature seen so far (``ops.linear_state``)

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        d = self.dims
        sums = linear_state.init_state(batch, d.num_kv_heads, self.config.num_features, d.head_dim)
        return {"projection": self.draw(), "sums": sums}

    def _favor(self, x, w):
        """(phi(x) with its max log-feature taken out, that max): FAVOR+ as ``attend`` computes it."""
        lx = favor_log_features(x, w)
        top = lax.stop_gradient(jnp.max(lx, axis=-1))
        return jnp.exp(lx - top[..., None]), top

    def _prefill(self, q, k, v, mask: Mask, state):
        w = state.data["projection"]
        phi_q, _ = self._favor(q, w)
        phi_k, k_scale = self._favor(masks.hide_keys(k, mask.kv_mask), w)
        out = linear_attention(
            phi_q, phi_k, v, causal=True, kv_mask=mask.kv_mask, k_log_scale=k_scale, eps=0.0,
            chunk_size=self.config.chunk_size,
        )
        sums = linear_state.summarise(phi_k, v, kv_mask=mask.kv_mask, k_log_scale=k_scale)
        return out, {"projection": w, "sums": sums}

    def _step(self, q_t, k_t, v_t, state):
        w = state.data["projection"]
        phi_q, _ = self._favor(q_t[:, None], w)
        phi_k, k_scale = self._favor(k_t[:, None], w)
        out, sums = _grouped_step(phi_q[:, 0], phi_k[:, 0], v_t, state.data["sums"], k_log_scale_t=k_scale[:, 0])
        return out, {"projection": w, "sums": sums}


# ------------------------------------------------------------------------------- cosformer


def _angle_features(x: Float[Array, "B N H D"], a: Float[Array, "B|1 N"]) -> Float[Array, "B N H 2D"]:
    """[relu(x_i) sin(a_i), relu(x_i) cos(a_i)] for the angle a_i of each token."""
    r = jax.nn.relu(x.astype(jnp.float32))
    a = a[:, :, None, None]
    return jnp.concatenate([r * jnp.sin(a), r * jnp.cos(a)], axis=-1)


def cosformer_features(
    x: Float[Array, "B N H D"], length: int
) -> Float[Array, "B N H 2D"]:
    """[relu(x_i) sin(a_i), relu(x_i) cos(a_i)] with a_i = pi i / (2 length), i = 1..N."""
    n = x.shape[1]
    return _angle_features(x, (math.pi / 2) * jnp.arange(1, n + 1, dtype=jnp.float32)[None] / length)


def segment_angles(
    q_segment_ids: Int[Array, "B T"], kv_segment_ids: Int[Array, "B S"]
) -> tuple[Float[Array, "B T"], Float[Array, "B S"]]:
    """cosformer's a_i = pi p_i / (2 M) per token of packed rows: p_i its position within its
    segment (1, 2, .. in order, whatever the ids' layout) and M that segment's length, the
    larger of its query and key counts (what the sequence alone would have: positions from 1,
    M = max(T, S) of its own call)."""

    def counts(x, sorted_ids):  # how many of sorted_ids equal each x
        return jnp.searchsorted(sorted_ids, x, side="right") - jnp.searchsorted(sorted_ids, x, side="left")

    def positions(ids, sorted_ids):  # 1-based rank among the earlier tokens of the same id
        order = jnp.argsort(ids, stable=True)
        rank = jnp.arange(ids.shape[0]) - jnp.searchsorted(sorted_ids, sorted_ids, side="left")
        return jnp.zeros(ids.shape, jnp.int32).at[order].set(rank.astype(jnp.int32)) + 1

    def row(qi, ki):
        sq, sk = jnp.sort(qi), jnp.sort(ki)
        m_q = jnp.maximum(counts(qi, sq), counts(qi, sk))
        m_k = jnp.maximum(counts(ki, sk), counts(ki, sq))
        angle = lambda p, m: (math.pi / 2) * p.astype(jnp.float32) / m.astype(jnp.float32)  # noqa: E731
        return angle(positions(qi, sq), m_q), angle(positions(ki, sk), m_k)

    return jax.vmap(row)(q_segment_ids, kv_segment_ids)


@dataclasses.dataclass(frozen=True)
class CosformerConfig:
    """eps: denominator stabiliser (released code: 1e-6). chunk_size: causal chunk length."""

    eps: float = 1e-6
    chunk_size: int = 64

    def __post_init__(self):
        _check_eps("cosformer", self.eps)
        check_positive_int("cosformer", "chunk_size", self.chunk_size)


@register(
    "cosformer",
    config=CosformerConfig,
    family="kernel",
    citation="Qin et al. 2022, cosFormer: Rethinking Softmax in Attention",
)
class Cosformer(Attention):
    """ReLU linear attention re-weighted by cos(pi/2 (i - j) / M); O(N d^2) time."""

    capabilities = Capabilities(causal=True, cross=True, kv_mask=True, exact=False, time="O(N d^2)", memory="O(N d)",
                                gqa=True, segments=True, decode=True)

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S Hkv D"],
        v: Float[Array, "B S Hkv Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        causal, kv_mask = _mask_parts(mask)
        q, k = poison_nonfinite_rows(q), _real_keys(k, kv_mask)
        if mask.q_segment_ids is None:
            length = max(q.shape[1], k.shape[1])
            phi_q, phi_k = cosformer_features(q, length), cosformer_features(k, length)
        else:  # positions restart per segment, M = the segment's length (module docstring)
            a_q, a_k = segment_angles(mask.q_segment_ids, mask.kv_segment_ids)
            phi_q, phi_k = _angle_features(q, a_q), _angle_features(k, a_k)
        return linear_attention(
            phi_q,
            phi_k,
            v,
            causal=causal,
            kv_mask=kv_mask,
            eps=self.config.eps,
            chunk_size=self.config.chunk_size,
            **_segments(mask),
        )

    # decoding: the running sums of phi(k_j) [v_j | 1]^T, where phi(k_j) carries the position
    # j through its sin/cos weights, so the state stays [2d, Dv + 1] per head; the position of
    # a step comes from the state (``state.position``). The re-weighting needs the length M
    # in a_i = pi i / (2M): the forward takes the call's length, decoding the state's
    # max_len, so a decoded sequence equals the causal forward over max_len tokens (and a
    # step past M would turn its cosines negative: init_state refuses max_len > dims.max_len)

    def _prefill(self, q, k, v, mask: Mask, state):
        M = state.max_len
        phi_k = cosformer_features(masks.hide_keys(k, mask.kv_mask), M)
        out = linear_attention(
            cosformer_features(q, M), phi_k, v, causal=True, kv_mask=mask.kv_mask, eps=self.config.eps,
            chunk_size=self.config.chunk_size,
        )
        return out, linear_state.summarise(phi_k, v, kv_mask=mask.kv_mask)

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        d = self.dims
        return linear_state.init_state(batch, d.num_kv_heads, 2 * d.head_dim, d.head_dim)

    def _step(self, q_t, k_t, v_t, state):
        a = (math.pi / 2) * (state.position + 1).astype(jnp.float32) / state.max_len  # positions count from 1

        def phi(x):
            r = jax.nn.relu(x.astype(jnp.float32))
            return jnp.concatenate([r * jnp.sin(a), r * jnp.cos(a)], axis=-1)

        return _grouped_step(phi(q_t), phi(k_t), v_t, state.data, eps=self.config.eps)
