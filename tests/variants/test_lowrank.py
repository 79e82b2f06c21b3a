"""The math of the low-rank family: linformer and nystromformer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from conftest import build, jit_module, make_qkv
from efficient_attn.ops.reference.softmax import softmax_attention
from efficient_attn.variants.lowrank import iterative_pinv, landmark_weights, pooling_projection
from jaxpr_tools import max_intermediate_elems

B, H, D = 2, 2, 16


_qkv = functools.partial(make_qkv, B=B, H=H, D=D)  # the shared helpers at this file's sizes
_build = functools.partial(build, H=H, D=D)
_jit = jit_module


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _segmented(T, segments, seed, noise=0.02):
    """Queries and keys constant over `segments` contiguous equal segments (+ small noise):
    a rank-`segments` attention matrix, the case low-rank methods are built for."""
    kq, kk, kv, kn = jax.random.split(jax.random.key(seed), 4)
    rep = T // segments
    q = jnp.repeat(jax.random.normal(kq, (B, segments, H, D)), rep, axis=1)
    k = jnp.repeat(jax.random.normal(kk, (B, segments, H, D)), rep, axis=1)
    nq, nk = noise * jax.random.normal(kn, (2, B, T, H, D))
    return q + nq, k + nk, jax.random.normal(kv, (B, T, H, D))


# --------------------------------------------------------------------------------- linformer


def test_linformer_parameters_and_refusals():
    m = _build("linformer", max_len=96, rank=8)
    assert isinstance(m.e, nnx.Param) and m.e.shape == (96, 8)
    assert isinstance(m.f, nnx.Param) and m.f.shape == (96, 8)
    q, k, v = _qkv(20)
    with pytest.raises(ValueError, match="linformer"):
        m(q, k, v, mask=ea.Mask(causal=True))
    out = m(*_qkv(20, 33))  # cross attention: only keys and values are projected
    assert out.shape == (B, 20, H, D)
    with pytest.raises(ValueError, match="init"):
        ea.build("linformer", num_heads=H, head_dim=D, max_len=8, init="random")


def test_linformer_pool_init_at_full_rank_is_softmax_attention():
    """init='pool' with rank == max_len == N is the identity projection: exactly full."""
    T = 48
    f = _jit(_build("linformer", max_len=T, rank=T, init="pool"))
    q, k, v = _qkv(T, seed=1)
    m = np.ones((B, T), bool)
    m[0, 10:30] = False
    m[1, 5:] = False
    for mask in (None, ea.Mask(kv_mask=jnp.asarray(m))):
        np.testing.assert_allclose(f(q, k, v, mask), softmax_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)


def test_linformer_error_falls_with_rank_on_low_rank_input():
    T, segments = 64, 8
    errors = []
    for rank in (1, 2, 4, 8):
        f = _jit(_build("linformer", max_len=T, rank=rank, init="pool"))
        errors.append(np.mean([_rel(f(*x), softmax_attention(*x)) for x in (_segmented(T, segments, s) for s in range(3))]))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * errors[0], errors  # at rank == segments only the noise is lost


def test_linformer_masking_zeroes_rows_before_projection_and_drops_empty_slots():
    """Masked keys change nothing; slots reached by no real key are out of the softmax."""
    T, rank = 32, 8
    module = _build("linformer", max_len=64, rank=rank, init="pool")  # S = 32 < max_len: 4 slots beyond S
    f = _jit(module)
    q, k, v = _qkv(T, seed=2)
    m = np.ones((B, T), bool)
    m[0, 8:16] = False  # exactly pooling slot 1 of batch 0
    m[1, :] = False
    mask = ea.Mask(kv_mask=jnp.asarray(m))
    out = f(q, k, v, mask)
    hidden = jnp.asarray(~m)[:, :, None, None]
    k2, v2 = jnp.where(hidden, jnp.nan, k), jnp.where(hidden, 1e30, v)
    np.testing.assert_array_equal(np.asarray(f(q, k2, v2, mask)), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    # batch 0: softmax over the 3 live slots (0, 2, 3) of 8-token means (slots 4-7 lie beyond S)
    kp = k[0].reshape(4, 8, H, D).mean(1)[jnp.array([0, 2, 3])]
    vp = v[0].reshape(4, 8, H, D).mean(1)[jnp.array([0, 2, 3])]
    w = jax.nn.softmax(jnp.einsum("thd,rhd->htr", q[0], kp) / jnp.sqrt(D), axis=-1)
    np.testing.assert_allclose(out[0], jnp.einsum("htr,rhd->thd", w, vp), rtol=1e-5, atol=1e-6)


def test_pooling_projection_segments():
    p = pooling_projection(10, 4)  # segments of 3, 2, 3, 2 (floor(i * 4 / 10))
    np.testing.assert_allclose(p.sum(0), 1.0, rtol=1e-6)
    assert [int((p[:, r] > 0).sum()) for r in range(4)] == [3, 2, 3, 2]


# ----------------------------------------------------------------------------- nystromformer


def test_iterative_pinv_matches_the_pseudo_inverse():
    key = jax.random.key(3)
    a = jnp.eye(12) + 0.5 * jax.random.normal(key, (12, 12)) / jnp.sqrt(12.0)  # well conditioned
    assert float(jnp.linalg.svd(a, compute_uv=False)[-1]) > 0.3
    np.testing.assert_allclose(iterative_pinv(a, 8), jnp.linalg.pinv(a), rtol=1e-4, atol=1e-4)
    rect = jax.random.normal(key, (7, 12))  # rectangular: Moore-Penrose, not an inverse
    z = iterative_pinv(rect, 30)
    np.testing.assert_allclose(z, jnp.linalg.pinv(rect), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(rect @ z @ rect, rect, rtol=1e-4, atol=1e-4)
    # zero rows / columns (empty landmarks) stay exactly zero
    pad = jnp.zeros((14, 14)).at[:12, 1:13].set(a)
    zp = iterative_pinv(pad, 8)
    assert float(jnp.abs(zp[0]).max()) == 0.0 and float(jnp.abs(zp[:, 12:]).max()) == 0.0
    np.testing.assert_allclose(zp[1:13, :12], jnp.linalg.pinv(a), rtol=1e-4, atol=1e-4)


def test_landmark_segments_cover_real_tokens_only():
    valid = jnp.asarray(np.array([[1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1], [1] * 11], bool))
    w, nonempty = landmark_weights(valid, 2, 11, 3)
    # row 0: real tokens 0,1,3,4,5,8,9,10 (L = 8) -> segments of sizes 3, 3, 2 by floor(t * 3 / 8)
    groups = [np.nonzero(np.asarray(w[0, :, j]))[0].tolist() for j in range(3)]
    assert groups == [[0, 1, 3], [4, 5, 8], [9, 10]]
    # row 1: 11 tokens, no mask -> sizes 4, 4, 3 (m does not divide N: sizes differ by <= 1)
    sizes = [int((w[1, :, j] > 0).sum()) for j in range(3)]
    assert sizes == [4, 4, 3]
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)  # each landmark is a mean
    assert bool(nonempty.all())
    w, nonempty = landmark_weights(valid[:1], 1, 11, 10)  # more landmarks than real tokens
    assert int(nonempty.sum()) == 8 and float(w.sum()) == 8.0  # each real token alone, 2 empty


def test_nystromformer_with_n_landmarks_is_exact():
    """m >= N: every token is a landmark and the result is softmax attention (pinv error only).

    Inputs with a well-conditioned attention matrix (q = k, norm ~ 5 sqrt(d)): with 6
    iterations the pseudo-inverse converges when the singular values are not tiny.
    """
    T = 40
    q, _, v = _qkv(T, seed=4, scale=1.3)
    k = q
    for m in (T, 64):  # m == N, and m > N (empty landmarks)
        f = _jit(_build("nystromformer", num_landmarks=m))
        np.testing.assert_allclose(f(q, k, v), softmax_attention(q, k, v), rtol=1e-4, atol=1e-4)
    # with padding, real queries (which are the landmarks) are exact too
    msk = np.ones((B, T), bool)
    msk[0, 25:] = False
    mask = ea.Mask(kv_mask=jnp.asarray(msk), q_mask=jnp.asarray(msk))
    f = _jit(_build("nystromformer", num_landmarks=T))
    np.testing.assert_allclose(f(q, k, v, mask), softmax_attention(q, k, v, mask) * msk[:, :, None, None], rtol=1e-4, atol=1e-4)
    # (a generic input needs more iterations: see the cross-attention test)


def test_nystromformer_error_falls_with_landmarks():
    """On a rank-8 input (8 constant segments + noise) and on a generic random input.

    Not monotone from the first landmark: on the segmented input m = 1 (every output the same
    average) measured 0.67, m = 2 and 3 (landmarks straddling segments) 0.88 and 0.81, then
    0.60 (m = 4) and 0.01 (m = 8, landmarks aligned with the segments). The test starts at 2.
    """
    T, segments = 64, 8
    errors = []
    for m in (2, 4, 8):
        f = _jit(_build("nystromformer", num_landmarks=m))
        errors.append(np.mean([_rel(f(*x), softmax_attention(*x)) for x in (_segmented(T, segments, s) for s in range(3))]))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * errors[0], errors
    generic = []
    for m in (8, 16, 32):
        f = _jit(_build("nystromformer", num_landmarks=m))
        generic.append(np.mean([_rel(f(*x), softmax_attention(*x)) for x in (_qkv(T, seed=s, scale=0.7) for s in range(3))]))
    assert all(a > b for a, b in zip(generic, generic[1:])), generic


def test_nystromformer_cross_attention_and_uneven_segments():
    q, k, v = _qkv(29, 45, seed=6, scale=0.5)  # neither length divisible by the landmarks
    f = _jit(_build("nystromformer", num_landmarks=8))
    out = f(q, k, v)
    assert out.shape == (B, 29, H, D) and bool(jnp.all(jnp.isfinite(out)))
    assert _rel(out, softmax_attention(q, k, v)) < 0.5
    f = _jit(_build("nystromformer", num_landmarks=45, pinv_iterations=25))  # m >= max(T, S)
    np.testing.assert_allclose(f(q, k, v), softmax_attention(q, k, v), rtol=2e-3, atol=2e-3)


def test_nystromformer_masked_keys_are_out_of_landmarks_and_softmaxes():
    T = 36
    q, k, v = _qkv(T, seed=7)
    m = np.ones((B, T), bool)
    m[0, 3:20] = False
    m[1, :] = False
    mask = ea.Mask(kv_mask=jnp.asarray(m))
    f = _jit(_build("nystromformer", num_landmarks=6))
    out = f(q, k, v, mask)
    hidden = jnp.asarray(~m)[:, :, None, None]
    np.testing.assert_array_equal(np.asarray(f(q, jnp.where(hidden, jnp.nan, k), jnp.where(hidden, 1e30, v), mask)),
                                  np.asarray(out))
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    assert bool(jnp.all(jnp.isfinite(out)))


# ------------------------------------------------------------------- cost: memory and shapes




@pytest.mark.parametrize("name", ["linformer", "nystromformer"])
def test_no_quadratic_intermediate_forward_or_backward(name):
    """Only N x m and m x m matrices: nothing of N x N elements in forward + backward."""
    n = 512
    module = ea.build(name, num_heads=1, head_dim=16, max_len=n)
    graphdef, state = nnx.split(module)
    x = jnp.ones((1, n, 1, 16))
    mask = ea.Mask(kv_mask=jnp.ones((1, n), bool))

    def loss(q, k, v):
        return jnp.sum(nnx.merge(graphdef, state, copy=True)(q, k, v, mask=mask))

    biggest = max_intermediate_elems(jax.grad(loss, argnums=(0, 1, 2)), x, x, x)
    assert biggest < n * n // 4, biggest


def _compiled_bytes(name, n, backward, h=2, d=32):
    module = ea.build(name, num_heads=h, head_dim=d, max_len=4096, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)

    def f(q, k, v):
        return nnx.merge(graphdef, state, copy=True)(q, k, v)

    fn = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)) if backward else f
    spec = jax.ShapeDtypeStruct((1, n, h, d), jnp.float32)
    ma = jax.jit(fn).lower(spec, spec, spec).compile().memory_analysis()
    return ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes


@pytest.mark.parametrize("name", ["linformer", "nystromformer"])
def test_memory_grows_linearly(name):
    """Compiled memory (compile only) at N = 1024 and 4096, forward and forward+backward: < 5x."""
    for backward in (False, True):
        small = _compiled_bytes(name, 1024, backward)
        large = _compiled_bytes(name, 4096, backward)
        assert large / small < 5.0, (name, backward, large / small)
