"""The math of the kernel family: linear, performer (FAVOR+), cosformer."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from conftest import build, jit_module, make_qkv
from efficient_attn.ops.reference.linear import (
    kernel_matrix_attention,
    linear_attention_log_features,
    linear_attention_recurrent,
)
from efficient_attn.ops.reference.softmax import softmax_attention
from efficient_attn.variants.kernel import favor_log_features, orthogonal_gaussian
from jaxpr_tools import max_intermediate_elems

B, H, D = 2, 2, 16
KINDS = ("linear", "performer", "cosformer")


_qkv = functools.partial(make_qkv, B=B, H=H, D=D)  # the shared helpers at this file's sizes
_build = functools.partial(build, H=H, D=D)
_jit = jit_module


def _kv_mask(S, seed=3):
    m = np.random.default_rng(seed).random((B, S)) > 0.3
    m[:, 0] = True
    return jnp.asarray(m)


# ------------------------------------------------------------------------------------ linear


def recurrent_linear(q, k, v, eps):
    """Katharopoulos et al. eq. (16)-(18), one token at a time, with phi = elu + 1."""
    phi = lambda x: jax.nn.elu(x) + 1.0  # noqa: E731
    return jax.jit(linear_attention_recurrent, static_argnames=("eps",))(phi(q), phi(k), v, eps=eps)


def test_causal_linear_equals_its_recurrent_form():
    q, k, v = _qkv(45, seed=1)  # 45 = 2 chunks of 16 + 13 with chunk_size 16
    f = _jit(_build("linear", chunk_size=16))
    got = f(q, k, v, ea.Mask(causal=True))
    np.testing.assert_allclose(got, recurrent_linear(q, k, v, 1e-6), rtol=2e-5, atol=2e-6)


def test_linear_equals_quadratic_form_with_masks_and_cross():
    phi = lambda x: jax.nn.elu(x) + 1.0  # noqa: E731
    f = _jit(_build("linear"))
    for T, S, causal in ((33, 33, True), (21, 40, False)):
        q, k, v = _qkv(T, S, seed=2)
        m = _kv_mask(S)
        w = jnp.einsum("bthd,bshd->bhts", phi(q), phi(k))
        want = kernel_matrix_attention(w, v, causal=causal, kv_mask=m, eps=1e-6)  # eps in the denominator
        np.testing.assert_allclose(f(q, k, v, ea.Mask(causal=causal, kv_mask=m)), want, rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------------- performer


def test_orthogonal_random_features_structure():
    d, m = 16, 40  # 2 full blocks + a partial one
    w = orthogonal_gaussian(jax.random.key(0), m, d)
    assert w.shape == (m, d)
    for start in range(0, m, d):
        blk = w[start : start + d]
        gram = blk @ blk.T
        off = gram - jnp.diag(jnp.diag(gram))
        assert float(jnp.abs(off).max()) < 1e-4 * float(jnp.diag(gram).max())  # rows orthogonal
    # the row norms are chi(d): E|w|^2 = d, and each coordinate is N(0, 1) marginally
    many = jax.jit(jax.vmap(lambda k: orthogonal_gaussian(k, 16, d)))(jax.random.split(jax.random.key(1), 300))
    sq = jnp.sum(many**2, axis=-1)
    assert abs(float(sq.mean()) - d) < 4 * float(sq.std()) / math.sqrt(sq.size)
    assert abs(float(many.std()) - 1.0) < 0.03


def test_performer_kernel_estimator_is_unbiased():
    """Mean over many redraws of phi(q) . phi(k) matches exp(q . k / sqrt(d)) within 4 s.e."""
    d, m, draws = 16, 32, 4000
    keys = jax.random.split(jax.random.key(11), draws)
    rng = np.random.default_rng(0)
    # |q|^2 ~ d s^2: the estimator's variance grows like exp(|q + k|^2 / sqrt(d)), so moderate norms
    pairs = [rng.normal(size=(2, d)) * s for s in (0.3, 0.6, 0.9)]
    pairs.append(np.stack([0.6 * rng.normal(size=d)] * 2))  # q == k: the largest kernel value

    @jax.jit
    def estimates(q, k):
        def one(key):
            w = orthogonal_gaussian(key, m, d)
            lq = favor_log_features(q[None, None, None], w)[0, 0, 0]
            lk = favor_log_features(k[None, None, None], w)[0, 0, 0]
            return jnp.sum(jnp.exp(lq + lk))

        return jax.vmap(one)(keys)

    for q, k in pairs:
        q, k = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
        est = np.asarray(estimates(q, k), np.float64)
        exact = math.exp(float(q @ k) / math.sqrt(d))
        se = est.std() / math.sqrt(draws)
        assert abs(est.mean() - exact) < 4 * se, (est.mean(), exact, se)
        assert se < 0.1 * exact  # the check has power: the tolerance is a small fraction of the value


def test_performer_error_falls_as_features_grow():
    """Relative error against full attention, averaged over 6 draws of W, falls with m."""
    T = 48
    q, k, v = _qkv(T, seed=4, scale=0.6)
    ref = softmax_attention(q, k, v)
    errors = []
    for m in (16, 64, 256, 1024):
        graphdef, _ = nnx.split(_build("performer", num_features=m, redraw=False))
        f = jax.jit(lambda st, q, k, v: nnx.merge(graphdef, st, copy=True)(q, k, v))
        errs = []
        for seed in range(6):  # a fresh W per seed, one compilation per m
            st = nnx.state(_build("performer", seed=seed, num_features=m, redraw=False))
            errs.append(float(jnp.linalg.norm(f(st, q, k, v) - ref) / jnp.linalg.norm(ref)))
        errors.append(np.mean(errs))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.35 * errors[0], errors  # ~ 1/sqrt(m): 8x more features -> ~0.35x error


def _performer_reference(q, k, v, w, causal, kv_mask):
    """The FAVOR+ estimate written quadratically in log space (no stabilisation tricks needed)."""
    return linear_attention_log_features(favor_log_features(q, w), favor_log_features(k, w), v, causal=causal,
                                         kv_mask=kv_mask)


@pytest.mark.parametrize("scale", [1.0, 12.0], ids=["normal", "huge_norms"])
def test_performer_equals_its_estimator_and_stabilisation_is_unbiased(scale):
    """Module == the log-space quadratic FAVOR+ estimate with the same W, also where exp overflows."""
    T = 33
    module = _build("performer", num_features=64, redraw=False, chunk_size=8)
    f = _jit(module)
    w = module.projection[...]
    q, k, v = _qkv(T, seed=5, scale=scale)
    k = k.at[:, 7].multiply(3.0)  # one key far larger than the rest
    m = _kv_mask(T)
    if scale > 1:  # the raw features would overflow / underflow float32
        lk = favor_log_features(k, w)
        assert float(lk.max()) > 88.0 or float(lk.min()) < -104.0
    for causal in (False, True):
        got = f(q, k, v, ea.Mask(causal=causal, kv_mask=m))
        want = _performer_reference(q, k, v, w, causal, m)
        assert bool(jnp.all(jnp.isfinite(got)))
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_performer_redraw_semantics():
    q, k, v = _qkv(20, seed=6)
    fixed = _build("performer", redraw=False, seed=1)
    assert isinstance(fixed.projection, nnx.Variable) and not isinstance(fixed.projection, nnx.Param)
    assert not jax.tree_util.tree_leaves(nnx.state(fixed, nnx.Param))  # nothing to train
    np.testing.assert_array_equal(np.asarray(fixed(q, k, v)), np.asarray(fixed(q, k, v)))

    fresh = _build("performer", redraw=True, seed=1)
    a, b = fresh(q, k, v), fresh(q, k, v)
    assert not np.allclose(a, b)  # a new projection on each call
    again = _build("performer", redraw=True, seed=1)
    np.testing.assert_array_equal(np.asarray(again(q, k, v)), np.asarray(a))  # same stream, same draws
    # through nnx.jit the stream advances too
    step = nnx.jit(lambda mod, q, k, v: mod(q, k, v))
    c, d = step(again, q, k, v), step(again, q, k, v)
    np.testing.assert_allclose(c, b, rtol=1e-5, atol=1e-6)  # the 2nd draw of the stream
    assert not np.allclose(c, d)


# --------------------------------------------------------------------------------- cosformer


def naive_cosformer(q, k, v, causal, kv_mask, eps=1e-6):
    """relu(q_i) . relu(k_j) cos(pi/2 (i - j) / M), M = max(T, S), normalised over j."""
    T, S = q.shape[1], k.shape[1]
    M = max(T, S)
    i = jnp.arange(1, T + 1)[:, None]
    j = jnp.arange(1, S + 1)[None, :]
    w = jnp.einsum("bthd,bshd->bhts", jax.nn.relu(q), jax.nn.relu(k)) * jnp.cos(jnp.pi / 2 * (i - j) / M)
    return kernel_matrix_attention(w, v, causal=causal, kv_mask=kv_mask, eps=eps)


def test_cosformer_equals_its_quadratic_formula():
    f = _jit(_build("cosformer", chunk_size=8))
    for T, S, causal, use_kv in ((37, 37, False, True), (37, 37, True, True), (25, 44, False, False)):
        q, k, v = _qkv(T, S, seed=7)
        m = _kv_mask(S) if use_kv else None
        got = f(q, k, v, ea.Mask(causal=causal, kv_mask=m))
        np.testing.assert_allclose(got, naive_cosformer(q, k, v, causal, m), rtol=1e-4, atol=1e-5)


def test_cosformer_reweighting_prefers_nearby_keys():
    """With identical keys the weights are cos(pi/2 |i - j| / M): nearer keys weigh more."""
    T = 40
    q = k = jnp.ones((1, T, 1, 4))
    v = jnp.eye(T)[None, :, None, :]  # one-hot values: out_i is the attention row of query i
    attn = ea.build("cosformer", num_heads=1, head_dim=4, max_len=T)(q, k, v)[0, :, 0]  # [T, T]
    want = jnp.cos(jnp.pi / 2 * jnp.abs(jnp.arange(T)[:, None] - jnp.arange(T)[None, :]) / T)
    want = want / want.sum(-1, keepdims=True)
    np.testing.assert_allclose(attn, want, rtol=1e-4, atol=1e-6)
    assert float(attn[0, 0]) > float(attn[0, 20]) > float(attn[0, 39]) > 0


# ------------------------------------------------------------------- cost: memory and shapes




@pytest.mark.parametrize("name", KINDS)
def test_no_quadratic_intermediate_forward_or_backward(name):
    """No array of N x N elements per (batch, head) anywhere in forward + backward."""
    n, h, d = 512, 1, 16
    module = ea.build(name, num_heads=h, head_dim=d, max_len=n, num_features=32) if name == "performer" else \
        ea.build(name, num_heads=h, head_dim=d, max_len=n)
    graphdef, state = nnx.split(module)
    x = jnp.ones((1, n, h, d))
    for causal in (False, True):
        def loss(q, k, v):
            return jnp.sum(nnx.merge(graphdef, state, copy=True)(q, k, v, mask=ea.Mask(causal=causal)))

        biggest = max_intermediate_elems(jax.grad(loss, argnums=(0, 1, 2)), x, x, x)
        assert biggest < n * n // 4, (name, causal, biggest)


def _compiled_bytes(name, n, causal, backward, h=2, d=32):
    module = ea.build(name, num_heads=h, head_dim=d, max_len=n, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    mask = ea.Mask(causal=causal)

    def f(q, k, v):
        return nnx.merge(graphdef, state, copy=True)(q, k, v, mask=mask)

    fn = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)) if backward else f
    spec = jax.ShapeDtypeStruct((1, n, h, d), jnp.float32)
    ma = jax.jit(fn).lower(spec, spec, spec).compile().memory_analysis()
    return ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes


@pytest.mark.parametrize("name", KINDS)
def test_causal_memory_grows_linearly(name):
    """Compiled memory (compile only, nothing runs) at N = 1024 and 4096: < 5x (quadratic: 16x).

    The causal path (the chunked scan), forward and forward+backward. The bidirectional path
    is checked for every variant by tests/conformance/test_scale.py (8K -> 32K); at B=1, H=8, D=64 and
    N = 2048 -> 8192 it measured 3.99x (linear), 4.00x (performer), 4.00x (cosformer).
    """
    for backward in (False, True):
        small = _compiled_bytes(name, 1024, True, backward)
        large = _compiled_bytes(name, 4096, True, backward)
        assert large / small < 5.0, (name, backward, large / small)
