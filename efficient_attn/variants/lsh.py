"""``reformer``: shared-QK attention restricted to locality-sensitive-hash buckets.

Kitaev, Kaiser and Levskaya, "Reformer: The Efficient Transformer", ICLR 2020 (section 2).

Shared QK. Keys are the normalised queries, k_j = q_j / ||q_j||, so a query and its key hash
alike; the ``k`` argument is accepted for the common interface and NOT used (the value ``v``
is). Because keys are tied to queries the variant cannot do cross attention, and its
capabilities refuse T != S. A model that wraps it may skip its key projection.

Hashing. For each of ``num_hashes`` rounds, a fixed random Gaussian matrix R [d, n_b / 2]
(per head, drawn from ``rngs`` at construction and stored in the non-trainable variable
``LSHRotations``) maps x to its bucket h(x) = argmax([x R ; -x R]) (angular LSH). The number
of buckets is n_b = 2 ceil(N / (2 m)) with m = ``bucket_size`` (average bucket size about m),
and n_b = 1 when N <= m. The rotations do not change between calls (no redraw).

Factorised buckets (as the paper's Trax code allows, ``n_buckets=[n1, n2, ...]``): one R of
n_b / 2 columns would make x R an N x N / (2 m) tensor, quadratic in N. Above
n_b = 64 (N > 64 m) the buckets are therefore a product of angular hashes, each of at most 64
buckets: h(x) = h_1(x) + 64 h_2(x) + ..., h_i(x) = argmax([x R_i ; -x R_i]), with the bucket
count rounded up to 64 * 2^j (so the average bucket holds between m / 2 and m tokens). Each
factor is the same angular LSH on its own rotations; the projections cost N x 32 per factor
and there are ceil(log_64 n_b) of them: time O(N log N), memory O(N). Up to n_b = 64 the
hash is the single-factor one, unchanged.

Attention. Tokens are sorted by (bucket, position) (a stable sort: O(N log N)) and cut into
chunks of m. In the sorted order, chunk c attends to chunks c - 1 and c (the first chunk only
to itself), with logits q_i . k_j / sqrt(d): divided by sqrt(d), not multiplied as in LRA's
code. A token never attends to itself unless no other key is visible to it: its own logit is
lowered by 1e5 as in trax, so it wins only when alone. Masks (causal, kv_mask) act on the
ORIGINAL positions, which the engine receives alongside the sorted sequence.

Causal. Where a token lands in the sorted order depends on how many tokens fall in lower
buckets, future ones included; with fixed chunk boundaries that would leak the future into
which past keys a query sees. Under ``Mask(causal=True)`` a query therefore sees, instead of
its chunk and the previous one, the (at most m) most recent earlier tokens *of its own
bucket* -- a sliding window of m over the sorted order restricted to its bucket -- which
depends on the past only. (Same cost; with N <= m it is all earlier tokens.)

Rounds. Each round r gives out_r and the log normaliser lse_r per query; the rounds are
combined as out = sum_r exp(lse_r - logsumexp_r lse_r) out_r, the paper's multi-round
softmax over the union with each key counted once per round it appears in (as in trax).

Cost: O(h N log N) for hashing and sorting, O(h N m d) for attention; memory O(h N d) (the
engine works through chunks in bounded runs, at least one chunk: O(m^2)).
Defaults: bucket_size 64, the paper's recommendation (LRA's chunk of 10 is far below it);
num_hashes 1 as in LRA (the paper reports more rounds help: 8 best, 4 acceptable).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from efficient_attn.core import Attention, Capabilities, Mask, check_positive_int
from efficient_attn.ops.block_sparse import block_sparse_attention, merge_softmax, num_blocks
from efficient_attn.ops.permute import inverse_permutation, take_rows
from efficient_attn.registry import Budget, register


@dataclasses.dataclass(frozen=True)
class ReformerConfig:
    """num_hashes: hashing rounds; bucket_size: chunk length m (and average bucket size)."""

    num_hashes: int = 1
    bucket_size: int = 64

    def __post_init__(self):
        check_positive_int("reformer", "num_hashes", self.num_hashes)
        check_positive_int("reformer", "bucket_size", self.bucket_size)


class LSHRotations(nnx.Variable):
    """Random rotations of the angular LSH, fixed at construction; not trainable."""


def num_buckets(length: int, bucket_size: int) -> int:
    """n_b = 2 ceil(N / (2 m)), or 1 when one chunk holds the whole sequence."""
    return 1 if length <= bucket_size else 2 * math.ceil(length / (2 * bucket_size))


MAX_FACTOR = 64  # buckets per angular hash; more are a product of hashes (module docstring)


def bucket_factors(length: int, bucket_size: int) -> tuple[int, ...]:
    """The bucket count as a product of angular hashes of at most ``MAX_FACTOR`` buckets each:
    ``(n_b,)`` up to 64 buckets, else ``(64, ..., 64, 2^j)`` with a product >= n_b."""
    nb = num_buckets(length, bucket_size)
    if nb <= MAX_FACTOR:
        return (nb,)
    rest = 2 ** math.ceil(math.log2(math.ceil(nb / MAX_FACTOR)))
    factors = [MAX_FACTOR]
    while rest > 1:
        f = min(rest, MAX_FACTOR)
        factors.append(f)
        rest //= f
    return tuple(factors)


def rotation_columns(max_len: int, bucket_size: int) -> int:
    """Columns of the stored rotations: n_b / 2 for one hash, 32 per factor otherwise."""
    factors = bucket_factors(max_len, bucket_size)
    return max(1, factors[0] // 2) if len(factors) == 1 else (MAX_FACTOR // 2) * len(factors)


def lsh_buckets(x: Float[Array, "B H T D"], rotations: Float[Array, "n H D K"], factors) -> Int[Array, "n B H T"]:
    """Angular LSH, factorised: bucket = sum_i argmax([x R_i ; -x R_i]) * prod_{j<i} f_j, where
    R_i are the f_i / 2 columns of ``rotations`` starting at 32 i (the first: at 0)."""
    if isinstance(factors, int):
        factors = (factors,)
    n, B, H, T = rotations.shape[0], x.shape[0], x.shape[1], x.shape[2]
    bucket = jnp.zeros((n, B, H, T), jnp.int32)
    stride = 1
    for i, f in enumerate(factors):
        if f == 1:
            continue
        start = i * (MAX_FACTOR // 2)
        rot = jnp.einsum("bhtd,nhdk->nbhtk", x, rotations[..., start:start + f // 2])
        h = jnp.argmax(jnp.concatenate([rot, -rot], axis=-1), axis=-1).astype(jnp.int32)
        bucket = bucket + h * stride
        stride *= f
    return bucket


def sort_by_bucket(buckets: Int[Array, "... T"]) -> Int[Array, "... T"]:
    """The permutation that sorts by (bucket, position): a stable argsort of the buckets."""
    return jnp.argsort(buckets, axis=-1, stable=True)


def reformer_attention(q, v, rotations, bucket_size: int, mask: Mask):
    """LSH attention on BTHD arrays (float32 result); see the module docstring."""
    B, T, H, D = q.shape
    n = rotations.shape[0]
    causal, kv = mask.causal, mask.kv_mask
    x = q.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, H, T, D]
    vh = v.astype(jnp.float32).transpose(0, 2, 1, 3)
    buckets = lsh_buckets(x, rotations, bucket_factors(T, bucket_size))  # [n, B, H, T]
    perm = sort_by_bucket(buckets)
    rows = perm.reshape(n * B * H, T)

    def gather(a):  # a: [B, H, T, E] -> sorted copies [n * B, H, T, E]
        a = jnp.broadcast_to(a[None], (n,) + a.shape).reshape(n * B * H, T, a.shape[-1])
        return take_rows(a, rows).reshape(n * B, H, T, -1)

    qs, vs = gather(x), gather(vh)
    # k = q / max(||q||, 1e-6), as 1 / sqrt(max(||q||^2, 1e-12)): the same, one fused pass
    ks = qs * jax.lax.rsqrt(jnp.maximum(jnp.sum(qs * qs, axis=-1, keepdims=True), 1e-12))
    pos = perm.reshape(n * B, H, T)
    kv_s = None
    if kv is not None:
        kv_s = jnp.take_along_axis(jnp.broadcast_to(kv[None, :, None, :], perm.shape), perm, axis=-1)
        kv_s = kv_s.reshape(n * B, H, T)
    m = min(bucket_size, T)
    nc = num_blocks(T, m)
    table = np.stack([np.arange(nc) - 1, np.arange(nc)], -1).astype(np.int32)  # chunk c sees c-1, c
    seg = None
    if causal:
        seg = jnp.take_along_axis(buckets, perm, axis=-1).reshape(n * B, H, T)
    out, lse = block_sparse_attention(
        qs, ks, vs, table, block_q=m, block_k=m, causal=causal, kv_valid=kv_s, q_pos=pos, k_pos=pos,
        q_seg=seg, k_seg=seg, band=(m, 0) if causal else None, self_mode="fallback",
    )
    inv = inverse_permutation(rows)  # undo the sort
    out = take_rows(out.reshape(n * B * H, T, -1), inv).reshape(n, B, H, T, -1)
    lse = jnp.take_along_axis(lse.reshape(n * B * H, T), inv, axis=-1).reshape(n, B, H, T)
    out, _ = merge_softmax(out, lse)
    return out.transpose(0, 2, 1, 3)


@register(
    "reformer",
    config=ReformerConfig,
    family="lsh",
    citation="Kitaev et al. 2020, Reformer: The Efficient Transformer",
    budget=Budget("num_hashes", (1, 2, 4, 8)),
    pattern_setting={"bucket_size": 8},
)
class ReformerAttention(Attention):
    """Reformer LSH attention: shared QK, sort by hash bucket, attend within chunks."""

    capabilities = Capabilities(causal=True, cross=False, kv_mask=True, exact=False, shared_qk=True,
                                time="O(N log N)", memory="O(N)")

    def __init__(self, config: ReformerConfig, dims, *, rngs: nnx.Rngs):
        super().__init__(config, dims, rngs=rngs)
        shape = (config.num_hashes, dims.num_heads, dims.head_dim, rotation_columns(dims.max_len, config.bucket_size))
        self.rotations = LSHRotations(jax.random.normal(rngs.params(), shape, jnp.float32))

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        del k  # shared-QK: keys are the normalised queries (module docstring)
        return reformer_attention(q, v, self.rotations[...], self.config.bucket_size, mask)
