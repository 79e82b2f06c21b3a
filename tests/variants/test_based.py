"""``based``: the Taylor map's identity; the fast path (block-sparse window + shifted linear
attention, merged) equals the two parts written densely with one normaliser, forward and
backward (dq, dk, dv, d q_proj, d k_proj); exact at window >= N; masked keys never matter."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn.ops.masks import masked_softmax
from efficient_attn.variants import based
from efficient_attn.variants.full import full_attention

H, D, F = 2, 8, 4
NAMES = ("dq", "dk", "dv", "d_q_proj", "d_k_proj")


def _inputs(T, seed=0, B=2):
    ks = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(kk, (B, T, H, D)) for kk in ks[:3])
    wq, wk = (jax.random.normal(kk, (H, D, F)) * 0.5 for kk in ks[3:])
    return q, k, v, wq, wk


def _kv_mask(B, T, seed, p=0.25):
    return jnp.asarray(np.random.default_rng(seed).random((B, T)) > p)


def assert_close(name, got, want, tol=2e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol, err_msg=name)


def based_dense(q, k, v, wq, wk, *, window, causal, kv_mask=None):
    """Both parts written densely: log-weights s_ij / sqrt(d) inside the window, log(1 + s~ + s~^2/2)
    outside it, one softmax over every visible key."""
    B, T = q.shape[:2]
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    near = (j > i - window) & (j <= i) if causal else jnp.abs(i - j) < window
    visible = jnp.ones((B, 1, T, T), bool)
    if causal:
        visible = visible & (j <= i)
    if kv_mask is not None:
        visible = visible & kv_mask[:, None, None, :]
    exact = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    qt, kt = jnp.einsum("bthd,hdf->bthf", q, wq), jnp.einsum("bshd,hdf->bshf", k, wk)
    s = jnp.einsum("bthf,bshf->bhts", qt, kt) / math.sqrt(F)
    logits = jnp.where(near, exact, jnp.log(1.0 + s + 0.5 * s * s))
    return jnp.einsum("bhts,bshe->bthe", masked_softmax(logits, visible), v)


def _fwd_and_grads(fn, args, seed=1):
    """fn's output and the gradients of <out, g> by name for a fixed random cotangent g (one jit)."""
    g = jax.random.normal(jax.random.key(seed), jax.eval_shape(fn, *args).shape)

    @jax.jit
    def both(args, g):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(g)

    out, grads = both(args, g)
    return out, dict(zip(NAMES, grads))


def test_taylor_map_identity():
    """phi(a) . phi(b) == 1 + a.b + (a.b)^2 / 2: the identity the feature map exists for."""
    a, b = jax.random.normal(jax.random.key(0), (2, 7, F))
    got = jnp.sum(based.taylor_features(a) * based.taylor_features(b), -1)
    ab = jnp.sum(a * b, -1)
    np.testing.assert_allclose(got, 1 + ab + ab**2 / 2, rtol=1e-5, atol=1e-5)
    assert based.taylor_features(a).shape[-1] == 1 + F + F * F


def test_paper_scaling_of_the_projected_features():
    """phi(q W) . phi(k W) = 1 + s + s^2/2 with s = (q W).(k W) / sqrt(d') (Based's scaling)."""
    q, k, _, wq, wk = _inputs(5)

    @jax.jit
    def both(q, k, wq, wk):
        got = jnp.sum(based.based_features(q, wq) * based.based_features(k, wk), -1)
        s = jnp.sum(jnp.einsum("bthd,hdf->bthf", q, wq) * jnp.einsum("bthd,hdf->bthf", k, wk), -1) / math.sqrt(F)
        return got, 1 + s + s**2 / 2

    got, want = both(q, k, wq, wk)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


CASES = [  # T, window, causal, kv_mask, chunk
    (37, 5, True, True, 8),
    (37, 5, False, True, 8),
    (53, 1, True, False, 16),
    (29, 9, False, False, 64),
]


@pytest.mark.parametrize("T,w,causal,masked,chunk", CASES)
def test_equals_dense_reference_forward_and_backward(T, w, causal, masked, chunk):
    q, k, v, wq, wk = _inputs(T, seed=T + w)
    kv = _kv_mask(2, T, seed=T) if masked else None
    fast = lambda *a: based.based_attention(*a, window=w, causal=causal, kv_mask=kv, chunk_size=chunk)  # noqa: E731
    dense = lambda *a: based_dense(*a, window=w, causal=causal, kv_mask=kv)  # noqa: E731
    out, grads = _fwd_and_grads(fast, (q, k, v, wq, wk))
    ref_out, ref_grads = _fwd_and_grads(dense, (q, k, v, wq, wk))
    assert_close("out", out, ref_out)
    for name in NAMES:
        assert_close(name, grads[name], ref_grads[name], tol=5e-5)
    assert np.abs(np.asarray(grads["d_q_proj"])).max() > 1e-4  # the linear part is in play


def test_module_uses_its_parameters_and_learns_them():
    """The registered module computes based_attention with its q_proj / k_proj, and nnx.grad
    reaches both projections."""
    T = 24
    q, k, v, _, _ = _inputs(T, seed=2)
    attn = ea.build("based", num_heads=H, head_dim=D, max_len=64, feature_dim=F, window=4)
    mask = ea.Mask(causal=True)
    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)

    @jax.jit
    def run(params, q, k, v):
        def loss(params):
            out = nnx.merge(graphdef, params, rest)(q, k, v, mask=mask)
            return jnp.sum(out**2), out

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        want = based.based_attention(q, k, v, params["q_proj"][...], params["k_proj"][...], window=4, causal=True)
        return out, want, grads

    out, want, grads = run(params, q, k, v)
    assert_close("out", out, want)
    for name in ("q_proj", "k_proj"):
        assert np.abs(np.asarray(grads[name][...])).max() > 0, name


@pytest.mark.parametrize("T,w,causal", [(37, 37, True), (21, 500, False)])
def test_exact_when_window_covers_the_sequence(T, w, causal):
    q, k, v, wq, wk = _inputs(T, seed=3)
    kv = _kv_mask(2, T, seed=4)
    mask = ea.Mask(causal=causal, kv_mask=kv)
    assert ea.get_spec("based").exact_limit(T) == {"window": T}
    out = jax.jit(lambda *a: based.based_attention(*a, window=w, causal=causal, kv_mask=kv))(q, k, v, wq, wk)
    assert_close("out", out, full_attention(q, k, v, mask))


def test_masked_keys_with_nan_and_inf_never_matter():
    T = 40
    q, k, v, wq, wk = _inputs(T, seed=5)
    kv = _kv_mask(2, T, seed=5, p=0.4)
    hide = ~kv[:, :, None, None]
    f = lambda *a: based.based_attention(*a, window=6, causal=False, kv_mask=kv, chunk_size=16)  # noqa: E731
    out, grads = _fwd_and_grads(f, (q, k, v, wq, wk))
    bad_out, bad_grads = _fwd_and_grads(f, (q, jnp.where(hide, jnp.nan, k), jnp.where(hide, jnp.inf, v), wq, wk))
    assert_close("out", bad_out, out, tol=0)
    for name in NAMES:
        assert_close(name, bad_grads[name], grads[name], tol=0)


def test_fully_masked_rows_are_zero():
    T = 24
    q, k, v, wq, wk = _inputs(T, seed=7)
    kv = jnp.ones((2, T), bool).at[1].set(False)
    out = jax.jit(lambda *a: based.based_attention(*a, window=4, causal=True, kv_mask=kv))(q, k, v, wq, wk)
    out = np.asarray(out)
    assert np.all(out[1] == 0) and np.all(np.isfinite(out))


def test_no_quadratic_intermediate():
    from jaxpr_tools import max_intermediate_elems

    T = 1024
    attn = ea.build("based", num_heads=2, head_dim=16, max_len=T)
    x = jnp.zeros((1, T, 2, 16))
    for causal in (True, False):
        fn = jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v, mask=ea.Mask(causal=causal))), argnums=(0, 1, 2))
        assert max_intermediate_elems(fn, x, x, x) < T * T, f"causal={causal}"


@pytest.mark.parametrize("field,bad", [("feature_dim", 0), ("window", 0), ("window", 2.5), ("chunk_size", True)])
def test_config_validation(field, bad):
    with pytest.raises(ValueError, match=field):
        ea.build("based", num_heads=H, head_dim=D, max_len=64, **{field: bad})
