"""``streaming``: exactly the sinks + window pattern, equal to a dense masked softmax over it
forward and backward; exact at window >= N; masked keys never matter; no N x N array."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from conftest import make_qkv
from efficient_attn.variants import streaming  # noqa: F401  (registers "streaming")
from efficient_attn.variants.full import full_attention

H, D = 2, 8


def _qkv(T, seed=0, B=2):
    return make_qkv(T, B=B, H=H, D=D, seed=seed)


def _kv_mask(B, T, seed, p=0.25):
    return jnp.asarray(np.random.default_rng(seed).random((B, T)) > p)


def assert_close(name, got, want, tol=2e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol, err_msg=name)


def _fwd_and_grads(fn, q, k, v, seed=1):
    """fn's output and the gradients of <out, g> for a fixed random cotangent g (one jit)."""
    g = jax.random.normal(jax.random.key(seed), jax.eval_shape(fn, q, k, v).shape)

    @jax.jit
    def both(q, k, v, g):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(g)

    out, grads = both(q, k, v, g)
    return out, dict(zip(("dq", "dk", "dv"), grads))


def sinks_and_window(T, window, num_sinks, causal):
    """[T, T] visibility: the window of recent (both sides: near) keys, or one of the sinks."""
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    near = (j > i - window) & (j <= i) if causal else np.abs(i - j) < window
    sink = (j < num_sinks) & ((j <= i) if causal else True)
    return near | sink


def _build(T, **hp):
    return ea.build("streaming", num_heads=H, head_dim=D, max_len=max(T, 64), **hp)


@pytest.mark.parametrize("T,w,s", [(61, 20, 4), (200, 130, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_probed_pattern_is_sinks_plus_window(T, w, s, causal):
    """q = k = 0 gives uniform weights over the visible keys; v = identity reads them out."""
    attn = _build(T, window=w, num_sinks=s)
    z = jnp.zeros((1, T, H, D))
    eye = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (1, T, H, T))
    weights = np.asarray(jax.jit(lambda z, e: attn(z, z, e, mask=ea.Mask(causal=causal)))(z, eye)[0, :, 0])
    np.testing.assert_array_equal(weights > 0, sinks_and_window(T, w, s, causal))
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "T,w,s,causal,masked",
    [(37, 5, 4, True, True), (53, 6, 3, False, True), (45, 17, 0, True, False), (33, 2, 9, True, True)],
)
def test_equals_dense_masked_softmax_forward_and_backward(T, w, s, causal, masked):
    q, k, v = _qkv(T, seed=T)
    kv = _kv_mask(2, T, seed=T) if masked else None
    attn = _build(T, window=w, num_sinks=s)
    out, grads = _fwd_and_grads(lambda q, k, v: attn(q, k, v, mask=ea.Mask(causal=causal, kv_mask=kv)), q, k, v)
    dense = ea.Mask(kv_mask=kv, dense=jnp.asarray(sinks_and_window(T, w, s, causal))[None, None])
    ref_out, ref_grads = _fwd_and_grads(lambda q, k, v: full_attention(q, k, v, dense), q, k, v)
    assert_close("out", out, ref_out)
    for name in ("dq", "dk", "dv"):
        assert_close(name, grads[name], ref_grads[name])


@pytest.mark.parametrize("T,w,causal", [(45, 45, True), (17, 500, False)])
def test_exact_when_window_covers_the_sequence(T, w, causal):
    q, k, v = _qkv(T, seed=T)
    kv = _kv_mask(2, T, seed=T + 1)
    mask = ea.Mask(causal=causal, kv_mask=kv)
    assert ea.get_spec("streaming").exact_limit(T) == {"window": T}
    out = jax.jit(lambda q, k, v: _build(T, window=w)(q, k, v, mask=mask))(q, k, v)
    assert_close("out", out, full_attention(q, k, v, mask))


def test_masked_keys_with_nan_and_inf_never_matter():
    T = 40
    q, k, v = _qkv(T, seed=5)
    kv = _kv_mask(2, T, seed=5, p=0.4).at[:, 1].set(False)  # a masked sink too
    hide = ~kv[:, :, None, None]
    attn = _build(T, window=6, num_sinks=4)
    f = lambda q, k, v: attn(q, k, v, mask=ea.Mask(causal=True, kv_mask=kv))  # noqa: E731
    out, grads = _fwd_and_grads(f, q, k, v)
    bad_out, bad_grads = _fwd_and_grads(f, q, jnp.where(hide, jnp.nan, k), jnp.where(hide, -jnp.inf, v))
    assert_close("out", bad_out, out, tol=0)
    for name in ("dq", "dk", "dv"):
        assert_close(name, bad_grads[name], grads[name], tol=0)


def test_fully_masked_rows_are_zero():
    T = 24
    q, k, v = _qkv(T, seed=7)
    kv = jnp.ones((2, T), bool).at[1].set(False)
    attn = _build(T, window=4)
    out = np.asarray(jax.jit(lambda q, k, v: attn(q, k, v, mask=ea.Mask(causal=True, kv_mask=kv)))(q, k, v))
    assert np.all(out[1] == 0) and np.all(np.isfinite(out))


def test_no_quadratic_intermediate():
    from jaxpr_tools import max_intermediate_elems

    T = 1024
    attn = ea.build("streaming", num_heads=2, head_dim=16, max_len=T)
    x = jnp.zeros((1, T, 2, 16))
    fn = jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v, mask=ea.Mask(causal=True))), argnums=(0, 1, 2))
    assert max_intermediate_elems(fn, x, x, x) < T * T


@pytest.mark.parametrize("field,bad", [("window", 0), ("window", 2.5), ("num_sinks", -1), ("num_sinks", True)])
def test_config_validation(field, bad):
    with pytest.raises(ValueError, match=field):
        ea.build("streaming", num_heads=H, head_dim=D, max_len=64, **{field: bad})


def test_cross_attention_is_refused_clearly():
    q = jnp.zeros((1, 8, H, D))
    k = jnp.zeros((1, 12, H, D))
    with pytest.raises(ea.CapabilityError, match="cross"):
        _build(16)(q, k, k)
