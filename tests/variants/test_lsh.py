"""reformer: angular LSH, sort by (bucket, position), chunked attention, self-exclusion, 1/sqrt(d).

The dense reference (efficient_attn/ops/reference/lsh.py: the [T, T] visibility of every
round written from the paper's description, small N) checks the whole pipeline, several hash
rounds and masks included; separate tests check the hashing, the sort, self-exclusion, the
scale, causal no-leak and memory growth.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from conftest import build, make_qkv
from efficient_attn.ops.reference.lsh import angular_buckets, lsh_attention_reference
from efficient_attn.ops.reference.softmax import softmax_attention
from efficient_attn.variants.lsh import LSHRotations, inverse_permutation, lsh_buckets, num_buckets, sort_by_bucket

H, D = 2, 8


_build = functools.partial(build, "reformer", H=H, D=D)  # the shared helpers at this file's sizes
_qkv = functools.partial(make_qkv, H=H, D=D)


def _run(attn, q, k, v, mask=None):
    return jax.jit(lambda q, k, v: attn(q, k, v, mask=mask))(q, k, v)


def np_buckets(x, R, nb):
    """Angular LSH of the dense reference (argmax over [x R ; -x R]) for one round R [H, D, K]."""
    return np.asarray(angular_buckets(jnp.asarray(x), jnp.asarray(R)[None], nb))[0]


def dense_reformer(q, v, rotations, m, causal, kv=None):
    """The dense reference (ops/reference/lsh.py): the [T, T] visibility of every round, made explicit."""
    kv = None if kv is None else jnp.asarray(kv)
    return jax.jit(lambda q, v: lsh_attention_reference(q, v, rotations, m, causal=causal, kv_mask=kv))(q, v)


@pytest.mark.parametrize("T,m,hashes", [(53, 8, 3), (40, 5, 1), (30, 64, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_dense_reference(T, m, hashes, causal):
    attn = _build(num_hashes=hashes, bucket_size=m)
    q, k, v = _qkv(T, seed=T)
    kv = np.random.default_rng(T).random((2, T)) > 0.2
    got = _run(attn, q, k, v, ea.Mask(causal=causal, kv_mask=kv))
    want = dense_reformer(q, v, attn.rotations[...], m, causal, kv)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_hashing_is_argmax_over_rotations_and_antipodal():
    T, nb = 40, 8
    x = jax.random.normal(jax.random.key(0), (2, H, T, D))
    R = jax.random.normal(jax.random.key(1), (3, H, D, 6))
    got = np.asarray(lsh_buckets(x, R, nb))
    for r in range(3):
        np.testing.assert_array_equal(got[r], np_buckets(np.asarray(x), np.asarray(R[r]), nb))
    np.testing.assert_array_equal(np.asarray(lsh_buckets(-x, R, nb)), (got + nb // 2) % nb)
    assert got.min() >= 0 and got.max() < nb and len(np.unique(got)) > nb // 2


def test_hashing_is_locality_sensitive():
    """Near vectors share a bucket far more often than random pairs (angular LSH)."""
    n, nb = 2000, 16
    R = jax.random.normal(jax.random.key(2), (1, 1, D, nb // 2))
    x = jax.random.normal(jax.random.key(3), (1, 1, n, D))
    near = x + 0.05 * jax.random.normal(jax.random.key(4), x.shape)
    far = jax.random.normal(jax.random.key(5), x.shape)
    b, bn, bf = (np.asarray(lsh_buckets(a, R, nb))[0, 0, 0] for a in (x, near, far))
    assert (b == bn).mean() > 0.85 and (b == bf).mean() < 0.2


def test_sort_is_by_bucket_then_position():
    buckets = jax.random.randint(jax.random.key(6), (3, 2, 50), 0, 6)
    perm = np.asarray(sort_by_bucket(buckets))
    bk = np.asarray(buckets)
    for idx in np.ndindex(3, 2):
        np.testing.assert_array_equal(perm[idx], np.lexsort((np.arange(50), bk[idx])))


def test_inverse_permutation_undoes_the_sort():
    perm = jnp.asarray(np.stack([np.random.default_rng(s).permutation(37) for s in range(6)]).reshape(2, 3, 37))
    inv = inverse_permutation(perm)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(perm), np.asarray(inv), -1),
                                  np.broadcast_to(np.arange(37), perm.shape))
    np.testing.assert_array_equal(inv, jnp.argsort(perm, axis=-1))


def test_number_of_buckets():
    assert num_buckets(64, 64) == 1 and num_buckets(65, 64) == 2
    assert num_buckets(1000, 10) == 100 and num_buckets(1001, 10) == 102


def _probe(attn, q, causal, kv=None):
    """[B, H, T, T] attention weights: v = identity."""
    B, T = q.shape[:2]
    eye = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (B, T, H, T))
    w = _run(attn, q, q, eye, ea.Mask(causal=causal, kv_mask=kv))
    return np.transpose(np.asarray(w), (0, 2, 1, 3))


def test_no_self_attention_when_other_keys_are_visible():
    T, m = 48, 8
    attn = _build(bucket_size=m, num_hashes=2)
    q, _, _ = _qkv(T, seed=1)
    w = _probe(attn, q, causal=False)
    assert np.all(np.diagonal(w, axis1=-2, axis2=-1) == 0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


def test_causal_self_attention_only_for_the_first_token_of_a_bucket():
    """Causal: a token sees earlier tokens of its own bucket; the first of a bucket sees only itself."""
    T, m = 48, 6
    attn = _build(bucket_size=m, num_hashes=1)
    q, _, _ = _qkv(T, seed=2)
    w = _probe(attn, q, causal=True)
    bk = np.asarray(lsh_buckets(q.transpose(0, 2, 1, 3), attn.rotations[...], num_buckets(T, m)))[0]
    first = np.zeros_like(bk, bool)
    for idx in np.ndindex(*bk.shape[:2]):
        _, at = np.unique(bk[idx], return_index=True)
        first[idx][at] = True
    np.testing.assert_allclose(np.diagonal(w, axis1=-2, axis2=-1), first.astype(float), atol=1e-6)
    assert np.all(np.triu(w, 1) == 0.0)


def test_self_is_a_fallback_under_kv_mask():
    """When every other key in reach is masked, a query attends to itself (if it is a real key)."""
    T = 10
    attn = _build(bucket_size=16)  # one chunk: every token in reach of every other
    q, _, _ = _qkv(T, seed=3, B=1)
    kv = np.zeros((1, T), bool)
    kv[0, 4] = True
    w = _probe(attn, q, causal=False, kv=kv)
    assert np.all(w[0, :, 4, 4] == 1.0)  # token 4: only itself
    np.testing.assert_allclose(w[0, :, np.r_[0:4, 5:T], 4], 1.0, rtol=1e-6)  # everyone else: token 4


@pytest.mark.parametrize("causal", [False, True])
def test_one_chunk_is_full_attention_with_normalised_keys_divided_by_sqrt_d(causal):
    """bucket_size >= T: one bucket, one chunk. Then reformer = softmax(q k^T / sqrt(d)) with
    k = q / |q| and the diagonal removed (kept for the first token under causal)."""
    T = 29
    attn = _build(bucket_size=32, num_hashes=2)
    q, k, v = _qkv(T, seed=4)
    kn = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (j < i) | ((i == 0) & (j == 0)) if causal else (i != j)
    want = softmax_attention(q, kn, v, ea.Mask(dense=jnp.asarray(allowed)[None, None]))
    np.testing.assert_allclose(_run(attn, q, k, v, ea.Mask(causal=causal)), want, atol=2e-5, rtol=2e-5)
    wrong_scale = softmax_attention(q * D, kn, v, ea.Mask(dense=jnp.asarray(allowed)[None, None]))  # LRA's * sqrt(d)
    assert not np.allclose(_run(attn, q, k, v, ea.Mask(causal=causal)), wrong_scale, atol=1e-3)


def test_causal_no_leak_across_buckets_and_chunks():
    """Changing the future (its queries move tokens between buckets) changes no earlier output."""
    T, cut = 64, 30
    attn = _build(bucket_size=4, num_hashes=3)
    q, k, v = _qkv(T, seed=5)
    q2, k2, v2 = _qkv(T, seed=6)
    fut = (jnp.arange(T) >= cut)[None, :, None, None]
    kv = np.random.default_rng(5).random((2, T)) > 0.2
    mask = ea.Mask(causal=True, kv_mask=kv)
    base = _run(attn, q, k, v, mask)
    changed = _run(attn, jnp.where(fut, q2, q), jnp.where(fut, k2, k), jnp.where(fut, v2, v), mask)
    np.testing.assert_allclose(changed[:, :cut], base[:, :cut], atol=1e-6)
    assert not np.allclose(changed[:, cut:], base[:, cut:])


def test_k_is_not_used_and_cross_attention_is_refused():
    attn = _build()
    q, k, v = _qkv(20)
    np.testing.assert_array_equal(_run(attn, q, k, v), _run(attn, q, -3.0 * k + 1.0, v))
    with pytest.raises(ValueError, match="cross"):
        attn(q, jnp.zeros((2, 25, H, D)), jnp.zeros((2, 25, H, D)))


def test_rotations_fixed_per_module_and_not_trained():
    a, b, c = _build(), _build(), _build(seed=1)
    np.testing.assert_array_equal(a.rotations[...], b.rotations[...])
    assert not np.array_equal(np.asarray(a.rotations[...]), np.asarray(c.rotations[...]))
    assert len(jax.tree.leaves(nnx.state(a, nnx.Param))) == 0
    assert len(jax.tree.leaves(nnx.state(a, LSHRotations))) == 1
    q, k, v = _qkv(100)
    np.testing.assert_array_equal(_run(a, q, k, v), _run(a, q, k, v))


@pytest.mark.parametrize("hp,field", [({"num_hashes": 0}, "num_hashes"), ({"bucket_size": 0}, "bucket_size"),
                                      ({"bucket_size": 8.0}, "bucket_size")])
def test_config_validation(hp, field):
    with pytest.raises(ValueError, match=field):
        _build(**hp)


def compiled_bytes(n, backward, *, max_len, H=2, D=32):
    attn = ea.build("reformer", num_heads=H, head_dim=D, max_len=max_len, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(attn)
    f = lambda q, k, v: nnx.merge(graphdef, state)(q, k, v)
    fn = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)) if backward else f
    spec = jax.ShapeDtypeStruct((1, n, H, D), jnp.float32)
    ma = jax.jit(fn).lower(spec, spec, spec).compile().memory_analysis()
    return ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
def test_memory_grows_less_than_5x_from_n_to_4n(backward):
    small, large = compiled_bytes(1024, backward, max_len=4096), compiled_bytes(4096, backward, max_len=4096)
    assert large / small < 5.0, f"reformer: memory grew {large / small:.2f}x from N=1024 to 4096"


def test_factorised_buckets_above_64():
    """Above 64 buckets the hash is a product of angular hashes of <= 64 buckets each, so the
    projection is N x 32 per factor instead of N x n_b / 2 (quadratic in N)."""
    from efficient_attn.variants.lsh import MAX_FACTOR, bucket_factors, rotation_columns

    assert bucket_factors(4096, 64) == (64,) and rotation_columns(4096, 64) == 32  # unchanged regime
    for n, m in [(4097, 64), (16384, 64), (65536, 64), (65536, 8), (10**6, 64)]:
        f = bucket_factors(n, m)
        prod = int(np.prod(f))
        assert all(1 < x <= MAX_FACTOR for x in f) and prod >= num_buckets(n, m) and prod < 2 * num_buckets(n, m)
    assert rotation_columns(65536, 64) == 32 * len(bucket_factors(65536, 64))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 1, 512, 16)), jnp.float32)
    R = jnp.asarray(rng.normal(size=(1, 1, 16, 64)), jnp.float32)
    factors = (64, 4)
    got = np.asarray(lsh_buckets(x, R, factors))
    assert got.min() >= 0 and got.max() < 256
    # each factor is the angular hash on its own columns
    np.testing.assert_array_equal(got % 64, np.asarray(lsh_buckets(x, R[..., :32], 64)))
    np.testing.assert_array_equal(got // 64, np.asarray(lsh_buckets(x, R[..., 32:34], 4)))
