"""Learned attention patterns: ``synthesizer`` and ``sinkhorn``.

synthesizer (Tay et al. 2021, "Synthesizer: Rethinking Self-Attention in Transformer
Models", ICML). The attention logits are not ``q . k``; they are *synthesised*:

    random:  A = softmax(R[:T, :S]),   R in R^{H x L x L} a learned matrix (L = max_len);
             with ``rank=r`` it is factorised, R = R1 R2 with R1 [H, L, r], R2 [H, r, L]
    dense:   A_i = softmax(W2 relu(W1 x_i + b1) + b2)[:S]   per head, W2 of width L,

    out = A V.

Random mode ignores q and k entirely (a learned, input-independent mixing pattern); dense
mode reads only the query side: ``x_i`` is the head's query vector ``q_i`` (the input of
the layer after the query projection of ``nn.MultiHeadAttention``), and never looks at k.
Logits are indexed by absolute positions (query position i, key position j), which is why
the parameters are sized from ``Dims.max_len``: a sequence longer than ``max_len`` has no
logits. Cross attention (T != S) is allowed: both position ranges are sliced from the same
[L, L] (dense: [L]) tables, exactly as LRA's code does; the pattern is then a learned map
from query positions to memory positions, meaningful only when memory positions carry a
consistent meaning across examples. Masks are applied to the logits (causal: j > i removed;
kv_mask: padded keys removed; a dense mask too), so a query that sees no key gets zeros.
Time O(N^2 d), memory O(N^2) activations plus O(H L^2) parameters (O(H L r) factorised):
the synthesizer saves the ``q k^T`` product, not the quadratic cost.

Defaults follow LRA: random mode, factorised with rank 32 (LRA's ``factorized_random``,
k = 32; ``rank=None`` gives the paper's unfactorised [H, L, L] random matrix). Random
logits start with unit variance (a random, visibly non-uniform pattern), trained unless
``fixed=True`` (the paper's "fixed random" ablation: drawn once, stored as a non-trainable
variable).

sinkhorn (Tay et al. 2020, "Sparse Sinkhorn Attention", ICML). The sequence is cut into
``nb = ceil(N / b)`` CONTIGUOUS blocks of ``b`` tokens (not LRA's stride groups, a known
defect of LRA's code). A sorting network scores block pairs and Sinkhorn balancing turns the
scores into a soft permutation P (nb x nb) that mixes whole key/value blocks; every query
block attends jointly (one softmax over 2b keys) to its own block and to its sorted block:

    e_j     = mean of the visible keys of block j                      (block summaries)
    R_i.    = F(e_i)[:nb],  F = linear (LRA), or linear-ReLU-linear (``sort_hidden > 0``),
              output width ceil(max_len / b), sliced to the actual nb
    log P   = R / tau, then ``sinkhorn_iterations`` times (in log space):
              rows -= logsumexp(rows);  columns -= logsumexp(columns)
    Ks_i    = sum_j P_ij (m_j * K_j) / mass_i,   mass_i = sum_j P_ij m_j     (per slot)
    Vs_i    = the same mixture of V
    out_i   = softmax([Q_i K_i^T, Q_i Ks_i^T + log mass_i] / sqrt(d)) [V_i ; Vs_i]

``m_j`` is the key mask of block j (kv_mask and internal padding), so a masked key enters
neither a block summary, nor a mixture, nor the local attention; a sorted slot whose real-key
mass is zero is invisible, and ``log mass`` lets a slot count in proportion to the real keys
it carries (0 without masks, where mass = row sum of P ~ 1).

Causal: row i of P may only mix PAST blocks j < i, and must be computed from positions
before block i. We therefore (1) feed row i of the sorting network the mean of the visible
keys of all blocks before i (an exclusive cumulative mean: LRA's code intended a cumulative
sum, marked "TODO verify"), (2) mask P to the strictly lower triangle, and (3) replace the
column normalisation by a causal one that divides by the cumulative column sum over rows
<= i (a scan down the rows). By induction every entry of row i then depends only on keys in
blocks < i; the local block is masked within the block (j <= i). This is our own balancing,
in the spirit of the paper's "Causal Sinkhorn Balancing"; it is no longer doubly
stochastic (row 0 is empty), and the tests check it leaks nothing.
The exclusive means are shifted inclusive sums, never ``cumsum(x) - x``: the subtraction
cancels, and a huge (or NaN) key of block i would leak into the summary of the blocks
before i, which queries of block i earlier than that key read.

Non-finite inputs (the rules of ``ops.masks``, for both variants): masked keys and values
are replaced by zeros with ``where`` before any product; a real key whose key or value
holds a NaN or Inf is zeroed in every product (block summaries, mixtures, local scores) and
its logits are made NaN, locally and in every sorted slot that may mix its block (causal:
the slots of later blocks), so exactly the queries that can see it are NaN. The synthesizer
does the same with values (it reads no key; random mode reads no query either, so a NaN
query changes nothing there).

Costs: scores O(N b), sort matrix O((N/b)^2), mixtures O(N d): memory O(N b + (N/b)^2).
Mixing keys is a [nb x nb] by [nb x b d] product: time O(N b d + N^2 d / b), still
quadratic in N but divided by b. Cross attention is refused (the local block of a query
is the key block at the same position). Any N: inputs are padded to a multiple of b and
the padding is masked.

Defaults: block_size 64 (LRA used 50; 64 divides the power-of-two lengths of the
experiments, so no padding is wasted, and matches BigBird's block in LRA);
sinkhorn_iterations 8 (LRA's code default is 1, which leaves the matrix far from doubly
stochastic: measured max |row sum - 1| for 12 x 12 unit-variance logits after 1 / 2 / 4 /
8 / 16 iterations = 0.25 / 0.07 / 6e-3 / 4e-5 / 2e-7; logits twice as sharp need ~16 for
2e-3; columns are exact after the last step); temperature 0.75
(below 1 sharpens P towards a permutation; LRA's code used 1.0). No Gumbel noise is added
(the paper's Gumbel-Sinkhorn option): outputs are deterministic.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array, Bool, Float

from efficient_attn.core import Attention, Capabilities, Dims, Mask, check_config, check_positive_int
from efficient_attn.ops import kv_cache
from efficient_attn.ops.masks import dense_visibility, masked_softmax, split_nonfinite
from efficient_attn.registry import Budget, register

__all__ = [
    "SynthesizerConfig",
    "SynthesizerAttention",
    "SinkhornConfig",
    "SinkhornAttention",
    "sinkhorn_log",
]

_NEG = -1e9  # a finite "minus infinity" for log-space masking (never NaN under exp/grad)


# --------------------------------------------------------------------------- synthesizer


@dataclasses.dataclass(frozen=True)
class SynthesizerConfig:
    """mode: "random" (LRA's choice, the default) or "dense".

    rank: random mode only: None = a full [H, L, L] logit matrix (the paper's Random
        Synthesizer); an int r = the factorised R1 R2 of rank r (LRA: 32, the default).
    fixed: random mode only: the logits are drawn once and not trained.
    dense_hidden: dense mode only: width of W1 (None = head_dim, the paper's d -> d -> L).
    """

    mode: str = "random"
    rank: int | None = 32
    fixed: bool = False
    dense_hidden: int | None = None

    def __post_init__(self):
        check_config("synthesizer", self.mode in ("random", "dense"),
                     f"mode must be 'random' or 'dense', got {self.mode!r}")
        if self.rank is not None:
            check_positive_int("synthesizer", "rank", self.rank)
        if self.dense_hidden is not None:
            check_positive_int("synthesizer", "dense_hidden", self.dense_hidden)
        check_config("synthesizer", isinstance(self.fixed, bool), f"fixed must be a bool, got {self.fixed!r}")
        check_config("synthesizer", not (self.fixed and self.mode != "random"),
                     "fixed=True applies to mode='random' only (dense logits come from a network); "
                     "set fixed=False or mode='random'")


class FixedLogits(nnx.Variable):
    """Random synthesizer logits drawn once at construction and never trained."""


@register(
    "synthesizer",
    config=SynthesizerConfig,
    family="learned",
    citation="Tay et al. 2021, Synthesizer: Rethinking Self-Attention in Transformer Models",
)
class SynthesizerAttention(Attention):
    """Synthesised attention logits (random: learned per position pair; dense: from the query)."""

    capabilities = Capabilities(
        causal=True, cross=True, kv_mask=True, dense_mask=True, exact=False,
        time="O(N^2)", memory="O(N^2)", decode=True,
    )

    def __init__(self, config: SynthesizerConfig, dims: Dims, *, rngs: nnx.Rngs):
        super().__init__(config, dims, rngs=rngs)
        H, L, D = dims.num_heads, dims.max_len, dims.head_dim
        if config.mode == "random":
            if config.rank is None:
                r = jax.random.normal(rngs.params(), (H, L, L), jnp.float32)
                self.logits = FixedLogits(r) if config.fixed else nnx.Param(r)
            else:
                std = config.rank ** -0.25  # so that (R1 R2) has unit-variance entries
                r1 = std * jax.random.normal(rngs.params(), (H, L, config.rank), jnp.float32)
                r2 = std * jax.random.normal(rngs.params(), (H, config.rank, L), jnp.float32)
                wrap = FixedLogits if config.fixed else nnx.Param
                self.left, self.right = wrap(r1), wrap(r2)
        else:
            hidden = config.dense_hidden or D
            self.w1 = nnx.Param(jax.random.normal(rngs.params(), (H, D, hidden), jnp.float32) / math.sqrt(D))
            self.b1 = nnx.Param(jnp.zeros((H, hidden), jnp.float32))
            self.w2 = nnx.Param(jax.random.normal(rngs.params(), (H, hidden, L), jnp.float32) / math.sqrt(hidden))
            self.b2 = nnx.Param(jnp.zeros((H, L), jnp.float32))

    def synthetic_logits(self, q: Float[Array, "B T H D"], S: int) -> Float[Array, "B|1 H T S"]:
        """The pre-mask logits: [1, H, T, S] in random mode (no input), [B, H, T, S] in dense."""
        T = q.shape[1]
        if self.config.mode == "random":
            if self.config.rank is None:
                return self.logits[...][None, :, :T, :S]
            left = self.left[...][:, :T]
            right = self.right[...][:, :, :S]
            return jnp.einsum("htr,hrs->hts", left, right)[None]
        x = q.astype(jnp.float32)
        h = jax.nn.relu(jnp.einsum("bthd,hde->bhte", x, self.w1[...]) + self.b1[...][None, :, None])
        return jnp.einsum("bhte,hes->bhts", h, self.w2[...][:, :, :S]) + self.b2[...][None, :, None, :S]

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        B, T, H, _ = q.shape
        S = k.shape[1]
        visible = dense_visibility(mask, B, T, S)
        vf = v.astype(jnp.float32)
        if visible is not None:  # a value no query sees is read by no product
            used = jnp.broadcast_to(jnp.any(visible, axis=2), (B, H, S)).transpose(0, 2, 1)[..., None]
            vf = jnp.where(used, vf, 0.0)
        vf, bad = split_nonfinite(vf)
        logits = jnp.broadcast_to(self.synthetic_logits(q, S), (B, H, T, S))
        logits = jnp.where(bad.transpose(0, 2, 1)[:, :, None, :], jnp.nan, logits)  # who sees a bad value is NaN
        weights = masked_softmax(logits, visible)
        return jnp.einsum("bhts,bshd->bthd", weights, vf)

    # decoding: a cache of the values only (the logits never read a key); a step's logits are
    # row ``position`` of the random table, or the dense network of its query, over the cache

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        d = self.dims
        return kv_cache.init_cache(batch, max_len, d.num_kv_heads, 0, d.head_dim, dtype)

    def _prefill(self, q, k, v, mask: Mask, state):
        return self.attend(q, k, v, mask), kv_cache.write(state.data, k[..., :0], v, 0, mask.kv_mask)

    def _logits_at(self, q_t: Float[Array, "B H D"], position, length: int) -> Float[Array, "B|1 H L"]:
        """The synthesised logits of the query at ``position`` over keys 0..length-1."""
        cfg = self.config
        if cfg.mode == "dense":
            return self.synthetic_logits(q_t[:, None], length)[:, :, 0]
        if cfg.rank is None:
            row = lax.dynamic_index_in_dim(self.logits[...], position, axis=1, keepdims=False)
            return row[None, :, :length]
        left = lax.dynamic_index_in_dim(self.left[...], position, axis=1, keepdims=False)  # [H, r]
        return jnp.einsum("hr,hrs->hs", left, self.right[...][:, :, :length])[None]

    def _step(self, q_t, k_t, v_t, state):
        p = state.position
        cache = kv_cache.write(state.data, k_t[:, None, :, :0], v_t[:, None], p)
        B, L = cache.valid.shape
        logits = jnp.broadcast_to(self._logits_at(q_t, p, L), (B, q_t.shape[1], L))
        return kv_cache.attend_logits(logits, cache.v, kv_cache.causal_visible(cache, p)), cache


# --------------------------------------------------------------------------- sinkhorn


@dataclasses.dataclass(frozen=True)
class SinkhornConfig:
    """block_size b (64; LRA 50), sinkhorn_iterations (8; LRA's code 1), temperature tau
    (0.75; LRA's code 1.0), sort_hidden (0 = a linear sorting network as in LRA; > 0 = a
    hidden ReLU layer of that width)."""

    block_size: int = 64
    sinkhorn_iterations: int = 8
    temperature: float = 0.75
    sort_hidden: int = 0

    def __post_init__(self):
        check_positive_int("sinkhorn", "block_size", self.block_size)
        check_positive_int("sinkhorn", "sinkhorn_iterations", self.sinkhorn_iterations)
        check_positive_int("sinkhorn", "sort_hidden", self.sort_hidden, minimum=0)
        t = self.temperature
        check_config("sinkhorn", isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0
                     and math.isfinite(t), f"temperature must be a positive finite number, got {t!r}")


def _cumulative_logsumexp_rows(logp: Float[Array, "... n n"]) -> Float[Array, "... n n"]:
    """out[i, j] = log sum_{i' <= i} exp(logp[i', j]), a scan down the rows.

    (``lax.cumlogsumexp`` gives the same values, but its gradient compiled ~10x slower.)
    """
    rows = jnp.moveaxis(logp, -2, 0)

    def step(carry, row):
        carry = jnp.logaddexp(carry, row)
        return carry, carry

    _, out = lax.scan(step, jnp.full(rows.shape[1:], _NEG, logp.dtype), rows)
    return jnp.moveaxis(out, 0, -2)


def _exclusive_cumsum(x: Float[Array, "..."], axis: int) -> Float[Array, "..."]:
    """out[i] = sum_{i' < i} x[i'], by shifting the inclusive sum one place (NOT ``cumsum(x) -
    x``: that cancels, so a huge or NaN x[i] would leak into out[i], i.e. a block's own keys
    into the summary that must hold only the blocks before it)."""
    c = jnp.cumsum(x, axis=axis)
    c = jnp.moveaxis(c, axis, 0)
    c = jnp.concatenate([jnp.zeros_like(c[:1]), c[:-1]], axis=0)
    return jnp.moveaxis(c, 0, axis)


def sinkhorn_log(
    logits: Float[Array, "... n n"],
    iterations: int,
    *,
    causal: bool = False,
) -> Float[Array, "... n n"]:
    """Sinkhorn balancing in log space; returns P = exp(log P) (0 where masked).

    Non-causal: alternately subtract row and column logsumexps, so P tends to a doubly
    stochastic matrix (exact column sums after the last step). Causal: entries j >= i are
    masked and the column step divides by the cumulative column sum over rows <= i, so
    row i depends only on rows <= i of ``logits``.
    """
    n = logits.shape[-1]
    if causal:
        valid = jnp.tril(jnp.ones((n, n), bool), k=-1)
    else:
        valid = jnp.ones((n, n), bool)

    def balance(_, logp):
        logp = jnp.where(valid, logp - jax.nn.logsumexp(logp, axis=-1, keepdims=True), _NEG)
        if causal:
            col = _cumulative_logsumexp_rows(logp)
        else:
            col = jax.nn.logsumexp(logp, axis=-2, keepdims=True)
        return jnp.where(valid, logp - col, _NEG)

    logp = lax.fori_loop(0, iterations, balance, jnp.where(valid, logits, _NEG))
    return jnp.where(valid, jnp.exp(logp), 0.0)


def _to_blocks(x, nb: int, b: int):
    """[B, nb*b, H, D] -> [B, H, nb, b, D]."""
    B, _, H, D = x.shape
    return x.reshape(B, nb, b, H, D).transpose(0, 3, 1, 2, 4)


@register(
    "sinkhorn",
    config=SinkhornConfig,
    family="learned",
    citation="Tay et al. 2020, Sparse Sinkhorn Attention",
    budget=Budget("block_size", (8, 16, 32, 64, 128), length_like=True),
    pattern_setting={"block_size": 8},
    exact_limit=lambda n: {"block_size": n},  # one block: sorting is the identity
)
class SinkhornAttention(Attention):
    """Local block + a learned, Sinkhorn-balanced soft permutation of key blocks."""

    capabilities = Capabilities(
        causal=True, cross=False, kv_mask=True, dense_mask=False, exact=False,
        time="O(N b + N^2/b)", memory="O(N b + (N/b)^2)",
    )

    def __init__(self, config: SinkhornConfig, dims: Dims, *, rngs: nnx.Rngs):
        super().__init__(config, dims, rngs=rngs)
        H, D = dims.num_heads, dims.head_dim
        self.max_blocks = -(-dims.max_len // config.block_size)
        width_in = D
        if config.sort_hidden:
            hid = config.sort_hidden
            self.w_hidden = nnx.Param(jax.random.normal(rngs.params(), (H, D, hid), jnp.float32) / math.sqrt(D))
            self.b_hidden = nnx.Param(jnp.zeros((H, hid), jnp.float32))
            width_in = hid
        self.w_sort = nnx.Param(
            jax.random.normal(rngs.params(), (H, width_in, self.max_blocks), jnp.float32) / math.sqrt(width_in)
        )
        self.b_sort = nnx.Param(jnp.zeros((H, self.max_blocks), jnp.float32))

    def _padded(self, k, kv_mask, N: int):
        b = self.config.block_size
        nb = -(-N // b)
        pad = nb * b - N
        valid = jnp.ones((k.shape[0], N), bool) if kv_mask is None else kv_mask
        if pad:
            valid = jnp.pad(valid, ((0, 0), (0, pad)))
        return nb, pad, valid

    def sort_matrix(
        self,
        kb: Float[Array, "B H nb b D"],
        valid: Bool[Array, "B nb b"],
        causal: bool,
    ) -> Float[Array, "B H nb nb"]:
        """The soft block permutation P from the key blocks (masked keys excluded)."""
        nb = kb.shape[2]
        m = valid.astype(jnp.float32)[:, None]  # [B, 1, nb, b]
        sums = jnp.einsum("bhnsd,bhns->bhnd", kb, jnp.broadcast_to(m, kb.shape[:4]))
        counts = jnp.sum(m, axis=-1)[..., None]  # [B, 1, nb, 1]
        if causal:  # row i sees only blocks before i: exclusive cumulative mean
            sums = _exclusive_cumsum(sums, axis=2)
            counts = _exclusive_cumsum(counts, axis=2)
        e = sums / jnp.maximum(counts, 1.0)
        if self.config.sort_hidden:
            e = jax.nn.relu(jnp.einsum("bhnd,hde->bhne", e, self.w_hidden[...]) + self.b_hidden[...][None, :, None])
        r = jnp.einsum("bhne,hem->bhnm", e, self.w_sort[...][:, :, :nb]) + self.b_sort[...][None, :, None, :nb]
        return sinkhorn_log(r / self.config.temperature, self.config.sinkhorn_iterations, causal=causal)

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        B, N, H, D = q.shape
        b = self.config.block_size
        nb, pad, valid = self._padded(k, mask.kv_mask, N)
        f32 = [jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v)]
        qb, kb, vb = (_to_blocks(x, nb, b) for x in f32)  # [B, H, nb, b, D]
        vblk = valid.reshape(B, nb, b)
        m = vblk[:, None, :, :, None]  # [B, 1, nb, b, 1]
        # masked keys/values are exactly zero from here on (where: a NaN there must not leak)
        kb, vb = jnp.where(m, kb, 0.0), jnp.where(m, vb, 0.0)
        # a real key whose key or value is not finite is zeroed in every product and poisons
        # (NaN logits) exactly the queries that see it: locally, or through a sorted slot
        # that may mix its block
        bad = jnp.logical_not(jnp.all(jnp.isfinite(kb), axis=-1) & jnp.all(jnp.isfinite(vb), axis=-1))  # [B, H, nb, b]
        kb, vb = jnp.where(bad[..., None], 0.0, kb), jnp.where(bad[..., None], 0.0, vb)
        mixes = jnp.tril(jnp.ones((nb, nb), jnp.float32), k=-1) if mask.causal else jnp.ones((nb, nb), jnp.float32)
        slot_bad = jnp.einsum("ij,bhjs->bhis", mixes, bad.astype(jnp.float32)) > 0  # [B, H, nb, b]

        p = self.sort_matrix(kb, vblk, mask.causal)  # [B, H, nb, nb]
        mass = jnp.einsum("bhij,bjs->bhis", p, vblk.astype(jnp.float32))  # real-key mass per slot
        has = mass > 0
        safe = jnp.where(has, mass, 1.0)
        ks = jnp.einsum("bhij,bhjsd->bhisd", p, kb) / safe[..., None]
        vs = jnp.einsum("bhij,bhjsd->bhisd", p, vb) / safe[..., None]

        scale = 1.0 / math.sqrt(D)
        s_local = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, kb) * scale
        s_local = jnp.where(bad[:, :, :, None, :], jnp.nan, s_local)
        s_sort = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, ks) * scale + jnp.log(safe)[:, :, :, None, :]
        s_sort = jnp.where(slot_bad[:, :, :, None, :], jnp.nan, s_sort)
        vis_local = vblk[:, None, :, None, :]  # [B, 1, nb, 1, b]
        if mask.causal:
            vis_local = vis_local & jnp.tril(jnp.ones((b, b), bool))
        vis_local = jnp.broadcast_to(vis_local, s_local.shape)
        vis_sort = jnp.broadcast_to(has[:, :, :, None, :], s_sort.shape)
        w = masked_softmax(jnp.concatenate([s_local, s_sort], -1), jnp.concatenate([vis_local, vis_sort], -1))
        out = jnp.einsum("bhnqk,bhnkd->bhnqd", w[..., :b], vb) + jnp.einsum("bhnqk,bhnkd->bhnqd", w[..., b:], vs)
        Dv = v.shape[-1]
        out = out.transpose(0, 2, 3, 1, 4).reshape(B, nb * b, H, Dv)
        return out[:, :N]
