"""``local``: the window is contiguous and exactly |i - j| <= w (causal: 0 <= i - j <= w)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from conftest import make_qkv
from efficient_attn.ops.reference.softmax import softmax_attention

H, D = 2, 8


_qkv = functools.partial(make_qkv, H=H, D=D)  # the shared helpers at this file's sizes


def _run(attn, q, k, v, mask):
    return jax.jit(lambda q, k, v: attn(q, k, v, mask=mask))(q, k, v)


def _band(T, w, causal):
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    return (j >= i - w) & (j <= (i if causal else i + w))


@pytest.mark.parametrize("T,w", [(37, 3), (61, 20), (200, 130)])
@pytest.mark.parametrize("causal", [False, True])
def test_probed_pattern_is_the_contiguous_window(T, w, causal):
    """q = k = 0 gives uniform weights over the visible keys; v = identity reads them out."""
    attn = ea.build("local", num_heads=H, head_dim=D, max_len=256, window=w)
    z = jnp.zeros((1, T, H, D))
    eye = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (1, T, H, T))
    weights = np.asarray(_run(attn, z, z, eye, ea.Mask(causal=causal))[0, :, 0])
    np.testing.assert_array_equal(weights > 0, _band(T, w, causal))
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_equals_full_with_the_band_as_dense_mask(causal):
    T, w = 53, 6
    q, k, v = _qkv(T)
    kv = np.random.default_rng(0).random((2, T)) > 0.25
    attn = ea.build("local", num_heads=H, head_dim=D, max_len=64, window=w)
    got = _run(attn, q, k, v, ea.Mask(causal=causal, kv_mask=kv))
    dense = jnp.asarray(_band(T, w, causal))[None, None]
    want = softmax_attention(q, k, v, ea.Mask(kv_mask=kv, dense=dense))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("T,w", [(45, 44), (45, 45), (17, 500)])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_when_window_covers_the_sequence(T, w, causal):
    q, k, v = _qkv(T, seed=T)
    kv = np.random.default_rng(T).random((2, T)) > 0.3
    attn = ea.build("local", num_heads=H, head_dim=D, max_len=64, window=w)
    mask = ea.Mask(causal=causal, kv_mask=kv)
    np.testing.assert_allclose(_run(attn, q, k, v, mask), softmax_attention(q, k, v, mask), atol=2e-5, rtol=2e-5)


def test_smaller_window_is_not_full():
    q, k, v = _qkv(40)
    attn = ea.build("local", num_heads=H, head_dim=D, max_len=64, window=5)
    assert not np.allclose(_run(attn, q, k, v, None), softmax_attention(q, k, v), atol=1e-3)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="window"):
        ea.build("local", num_heads=H, head_dim=D, max_len=64, window=bad)


def compiled_bytes(name, n, backward, *, H=2, D=32, max_len=None, **hp):
    """temp + argument + output bytes of the compiled forward (or grad of sum); nothing runs."""
    attn = ea.build(name, num_heads=H, head_dim=D, max_len=max_len or n, rngs=nnx.Rngs(0), **hp)
    graphdef, state = nnx.split(attn)
    f = lambda q, k, v: nnx.merge(graphdef, state)(q, k, v)
    fn = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)) if backward else f
    spec = jax.ShapeDtypeStruct((1, n, H, D), jnp.float32)
    ma = jax.jit(fn).lower(spec, spec, spec).compile().memory_analysis()
    return ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
def test_memory_grows_linearly(backward):
    small = compiled_bytes("local", 1024, backward, max_len=4096)
    large = compiled_bytes("local", 4096, backward, max_len=4096)
    assert large / small < 5.0, f"local: memory grew {large / small:.2f}x from N=1024 to 4096"
