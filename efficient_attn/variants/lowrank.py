"""Low-rank attention: ``linformer`` and ``nystromformer``. Nothing of size N x N is formed.

linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity"). Keys and
values are projected along the LENGTH axis to k rows by learned E, F in R^{max_len x k}:

    K' = E[:S]^T K,  V' = F[:S]^T V              [k, d]
    out = softmax(Q K'^T / sqrt(d)) V'           time O(N k d), memory O(N k + N d)

E and F are ``nnx.Param``, sized from ``Dims.max_len`` and sliced to the first S rows for a
shorter input (the paper fixes n = max_len). One E and one F are shared by all heads of the
layer (the paper's "headwise sharing"), separate for keys and values (not the paper's
key-value sharing): 2 max_len k parameters per layer. ``rank`` k = 32, the upper end of
the 16-32 LRA used: the error falls with k, and at N >= 1K the N k d cost of k = 32 is still
a small fraction of N^2 d. ``init``:
  * "gaussian" (default): i.i.d. N(0, 1/max_len), a LeCun-normal init over the length axis
    (fan-in max_len), so a projected key has the scale of one key (the paper's JL argument
    uses random Gaussian projections; its code and LRA's learn a dense layer);
  * "pool": mean pooling over k contiguous segments of [0, max_len) (the paper's "general
    projections": pooling with kernel = stride = n/k). With max_len == N and k == N it is the
    identity (linformer == full), and on inputs that are constant over those segments it is
    exact; it is a starting point, the projections are trained either way.
An untrained gaussian projection mixes all keys into every slot; it does not converge to
softmax attention as k grows (only a trained or pooling E can), which is why the tests
measure convergence with "pool".
Masks: a masked key's row of K and V is zeroed before the projection (so it contributes
nothing to K', V'). A slot r that no real key reaches (sum_s |E_sr| [s real] == 0, e.g. a
pooling segment that lies entirely in padding or beyond S) is removed from the softmax, so
a query whose keys are all masked gets zeros. Causal masking is refused: every slot mixes
past and future keys (LRA's code ignored the causal flag). Cross attention (T != S) is
fine: only keys and values are projected.

nystromformer (Xiong et al. 2021, "Nystromformer: A Nystrom-Based Algorithm for
Approximating Self-Attention", AAAI). With m landmarks Q~ [m, d], K~ [m, d] (segment means
of the queries and of the keys) and A(X, Y) = softmax(X Y^T / sqrt(d)) row-wise:

    out = A(Q, K~) pinv(A(Q~, K~)) (A(Q~, K) V)      [T x m] [m x m] [m x S][S x d]

evaluated right to left: memory O(N m + m^2), time O(N m d + m^3 * pinv_iterations).
pinv is the paper's iteration (Razavi et al. 2014): Z_0 = A^T / (||A||_1 ||A||_inf) (max
column sum times max row sum, per batch and head; the released code uses one scalar for the
whole batch), then ``pinv_iterations`` times (paper: 6)

    Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4.

In the eigenbasis of A Z_0 the residual r = 1 - sigma^2 / (||A||_1 ||A||_inf) maps to
0.75 r^3 + 0.25 r^4: fast for well-conditioned A, slow for directions with small singular
values (a near-uniform attention matrix), where more iterations are needed. In float32 a
direction with sigma ~ 0 sits at the unstable fixed point r = 1 (1 + e maps to 1 + 3.25 e):
dozens of iterations on a nearly singular A amplify rounding there (measured: 30 iterations
on a 20 x 20 softmax matrix with sigma_min = 1e-6 blew up); the paper's 6 bound the growth
to ~1e3 ulp.
Segments: landmark i averages the tokens whose rank among the REAL tokens of the row, t, has
floor(t m / L) == i, L = the row's number of real tokens: m contiguous segments of
floor(L/m) or ceil(L/m) real tokens when m does not divide L (the released code requires
m to divide N). With m >= L every real token is its own landmark (m > L leaves landmarks
empty), so with m >= N the result equals softmax attention up to the pinv iteration error
(A(Q~, K~) is then A(Q, K) itself; a query that is not a landmark, e.g. a padded one, is
exact only once the pseudo-inverse has converged in every direction).
Masks: key landmarks average only keys with kv_mask True, query landmarks only queries with
q_mask True (if given; otherwise, for self-attention shapes T == S, the kv_mask, since
padding is shared; otherwise all queries). Empty landmarks are removed from every softmax
(columns of A(Q, K~) and A(Q~, K~)) and their rows of A(Q~, K~) and A(Q~, K) are zero; the
pinv iteration keeps those rows and columns at zero. Masked keys are removed from the
softmax of A(Q~, K). A row with no real key thus gets zeros. Causal masking is refused (the
paper is bidirectional: every landmark mixes past and future). The paper's optional depthwise
convolution skip on V (the released code's conv_kernel_size) is not part of the attention
kernel and is not included. ``num_landmarks`` = 64, as in the paper's main experiments (the
authors' LRA configurations sweep 32 to 256).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from efficient_attn.core import Attention, Capabilities, Dims, Mask, check_config, check_positive_int
from efficient_attn.ops.masks import masked_softmax
from efficient_attn.registry import Budget, register

__all__ = [
    "LinformerConfig",
    "NystromformerConfig",
    "Linformer",
    "Nystromformer",
    "pooling_projection",
    "landmark_weights",
    "iterative_pinv",
]


# -------------------------------------------------------------------------------- linformer


def pooling_projection(length: int, rank: int) -> Float[Array, "L K"]:
    """[length, rank] mean pooling over ``rank`` near-equal contiguous segments of the positions."""
    seg = (jnp.arange(length) * rank) // length
    onehot = jax.nn.one_hot(seg, rank, dtype=jnp.float32)
    return onehot / jnp.maximum(onehot.sum(0, keepdims=True), 1.0)


@dataclasses.dataclass(frozen=True)
class LinformerConfig:
    """rank k of the length projections (LRA: 16-32); init "gaussian" (LRA) or "pool"."""

    rank: int = 32
    init: str = "gaussian"

    def __post_init__(self):
        check_positive_int("linformer", "rank", self.rank)
        check_config("linformer", self.init in ("gaussian", "pool"), f"init must be 'gaussian' or 'pool', got {self.init!r}")


@register(
    "linformer",
    config=LinformerConfig,
    family="lowrank",
    citation="Wang et al. 2020, Linformer: Self-Attention with Linear Complexity",
    budget=Budget("rank", (8, 16, 32, 64, 128, 256), length_like=True),
    pattern_setting={"rank": 16},
)
class Linformer(Attention):
    """Keys and values projected along the length axis to k rows by learned E, F; O(N k)."""

    capabilities = Capabilities(causal=False, cross=True, kv_mask=True, exact=False, time="O(N k d)", memory="O(N k)")

    def __init__(self, config: LinformerConfig, dims: Dims, *, rngs: nnx.Rngs):
        super().__init__(config, dims, rngs=rngs)
        shape = (dims.max_len, config.rank)
        if config.init == "pool":
            e = f = pooling_projection(*shape)
        else:
            std = dims.max_len**-0.5
            e = std * jax.random.normal(rngs.params(), shape, jnp.float32)
            f = std * jax.random.normal(rngs.params(), shape, jnp.float32)
        self.e = nnx.Param(e)
        self.f = nnx.Param(f)

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        S, D = k.shape[1], q.shape[-1]
        e, f = self.e[...][:S], self.f[...][:S]
        qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
        kv_mask = mask.kv_mask
        if kv_mask is not None:
            keep = kv_mask[:, :, None, None]
            kf, vf = jnp.where(keep, kf, 0.0), jnp.where(keep, vf, 0.0)
            real = kv_mask.astype(jnp.float32)
        else:
            real = jnp.ones(k.shape[:2], jnp.float32)
        kp = jnp.einsum("bshd,sr->brhd", kf, e)
        vp = jnp.einsum("bshd,sr->brhd", vf, f)
        # a slot that no real key reaches carries nothing: out of the softmax
        reach = (real @ jnp.abs(jax.lax.stop_gradient(e)) > 0) | (real @ jnp.abs(jax.lax.stop_gradient(f)) > 0)
        logits = jnp.einsum("bthd,brhd->bhtr", qf, kp) / jnp.sqrt(jnp.float32(D))
        weights = masked_softmax(logits, reach[:, None, None, :])
        return jnp.einsum("bhtr,brhd->bthd", weights, vp)


# ---------------------------------------------------------------------------- nystromformer


def landmark_weights(valid: Bool[Array, "B N"] | None, batch: int, n: int, m: int):
    """Segment-mean weights [B, N, m] (rows of real tokens sum to 1 per landmark) and [B, m] nonempty.

    Real token with rank t among the L real tokens of its row goes to landmark floor(t m / L).
    """
    if valid is None:
        valid = jnp.ones((batch, n), bool)
    rank = jnp.cumsum(valid, axis=1) - 1
    count = jnp.sum(valid, axis=1, keepdims=True)
    seg = (rank * m) // jnp.maximum(count, 1)
    seg = jnp.where(valid, seg, m)  # padding -> an index one_hot maps to an all-zero row
    onehot = jax.nn.one_hot(seg, m, dtype=jnp.float32)  # [B, N, m]
    sizes = onehot.sum(axis=1)  # [B, m]
    return onehot / jnp.maximum(sizes, 1.0)[:, None, :], sizes > 0


def iterative_pinv(a: Float[Array, "... m n"], iterations: int) -> Float[Array, "... n m"]:
    """Moore-Penrose pseudo-inverse by the iteration of the Nystromformer paper (Razavi et al.)."""
    eye = jnp.eye(a.shape[-2], dtype=a.dtype)
    col = jnp.max(jnp.sum(jnp.abs(a), axis=-2), axis=-1)  # ||A||_1
    row = jnp.max(jnp.sum(jnp.abs(a), axis=-1), axis=-1)  # ||A||_inf
    scale = col * row
    z0 = jnp.swapaxes(a, -1, -2) / jnp.where(scale > 0, scale, 1.0)[..., None, None]

    def step(_, z):
        az = a @ z
        return 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))

    return jax.lax.fori_loop(0, iterations, step, z0)


@dataclasses.dataclass(frozen=True)
class NystromformerConfig:
    """num_landmarks m (paper: 64); pinv_iterations of the pseudo-inverse (paper: 6)."""

    num_landmarks: int = 64
    pinv_iterations: int = 6

    def __post_init__(self):
        check_positive_int("nystromformer", "num_landmarks", self.num_landmarks)
        check_positive_int("nystromformer", "pinv_iterations", self.pinv_iterations)


@register(
    "nystromformer",
    config=NystromformerConfig,
    family="lowrank",
    citation="Xiong et al. 2021, Nystromformer: A Nystrom-Based Algorithm for Approximating Self-Attention",
    budget=Budget("num_landmarks", (8, 16, 32, 64, 128, 256), length_like=True),
    pattern_setting={"num_landmarks": 8},
)
class Nystromformer(Attention):
    """Nystrom approximation of the softmax matrix with segment-mean landmarks; O(N m)."""

    capabilities = Capabilities(
        causal=False, cross=True, kv_mask=True, exact=False, time="O(N m d + m^3)", memory="O(N m + m^2)"
    )

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        B, T, H, D = q.shape
        S = k.shape[1]
        m = self.config.num_landmarks
        kv_mask, q_valid = mask.kv_mask, mask.q_mask
        if q_valid is None and T == S:
            q_valid = kv_mask
        scale = D**-0.25  # q . k / sqrt(d) split between both sides
        qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
        qf, kf = qf * scale, kf * scale
        if kv_mask is not None:
            kf = jnp.where(kv_mask[:, :, None, None], kf, 0.0)
            vf = jnp.where(kv_mask[:, :, None, None], vf, 0.0)
        q_real = qf if q_valid is None else jnp.where(q_valid[:, :, None, None], qf, 0.0)
        wq, q_full = landmark_weights(q_valid, B, T, m)
        wk, k_full = landmark_weights(kv_mask, B, S, m)
        q_land = jnp.einsum("btl,bthd->blhd", wq, q_real)  # [B, m, H, D]
        k_land = jnp.einsum("bsl,bshd->blhd", wk, kf)

        k_vis = k_full[:, None, None, :]  # [B, 1, 1, m]
        q_rows = q_full[:, None, :, None]  # [B, 1, m, 1]
        kernel_1 = masked_softmax(jnp.einsum("bthd,blhd->bhtl", qf, k_land), k_vis)  # [B, H, T, m]
        kernel_2 = masked_softmax(jnp.einsum("bihd,bjhd->bhij", q_land, k_land), q_rows & k_vis)  # [B, H, m, m]
        key_vis = q_rows if kv_mask is None else q_rows & kv_mask[:, None, None, :]
        kernel_3 = masked_softmax(jnp.einsum("blhd,bshd->bhls", q_land, kf), key_vis)  # [B, H, m, S]

        context = jnp.einsum("bhls,bshd->bhld", kernel_3, vf)  # [B, H, m, Dv]
        context = iterative_pinv(kernel_2, self.config.pinv_iterations) @ context
        return jnp.einsum("bhtl,bhld->bthd", kernel_1, context)
