"""``attention_fn`` inside ``nnx.MultiHeadAttention(decode=True)``, on flax's own KV cache.

Against flax's default attention: an exact variant decodes exactly as flax's
``dot_product_attention`` does; ``local``'s window follows the cache index (checked against
flax's default attention given that window as a mask relative to the index, and against the
adapter's own causal forward over the whole sequence); every parameter-free decoding variant
decodes token by token as its causal forward over the sequence. One jitted step each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn import registry

B, L, F, HEADS = 2, 11, 16, 2
FREE_DECODERS = [n for n in ea.list_variants()
                 if ea.get_spec(n).capabilities.decode and not registry.has_parameters(n)]
NO_DECODE_NO_CROSS = [n for n in ea.list_variants()
                      if not ea.get_spec(n).capabilities.decode and not ea.get_spec(n).capabilities.cross
                      and not registry.has_parameters(n)]


def _mha(attention_fn=None, decode=True):
    kw = {} if attention_fn is None else {"attention_fn": attention_fn}
    return nnx.MultiHeadAttention(num_heads=HEADS, in_features=F, qkv_features=F, decode=decode,
                                  rngs=nnx.Rngs(0), **kw)


def _x(seed=1):
    return jax.random.normal(jax.random.key(seed), (B, L, F))


@nnx.jit
def _step(mha, x_t, mask):
    return mha(x_t, mask=mask)


def _decode(mha, x, masks=None):
    """Feed x one token at a time through flax's cache; ``masks(t)`` gives the caller's mask."""
    mha.init_cache((B, L, F))
    outs = [_step(mha, x[:, t:t + 1], None if masks is None else masks(t)) for t in range(L)]
    return jnp.concatenate(outs, axis=1)


def _causal(mha, x):
    return nnx.jit(lambda m, x: m(x, is_causal=True, decode=False))(mha, x)


def test_exact_variant_decodes_as_flax_default_attention():
    exact = registry.exact_reference()
    x = _x()
    ref = _decode(_mha(), x)
    ours = _decode(_mha(ea.attention_fn(exact)), x)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, _causal(_mha(decode=False), x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 3])
def test_local_window_follows_the_cache_index(window):
    name = "local"  # the contiguous sliding window i - w .. i
    x = _x(2)
    ours = _decode(_mha(ea.attention_fn(name, window=window)), x)
    # flax's default attention with the window as a mask relative to the cache index t
    ref = _decode(_mha(), x, masks=lambda t: (jnp.arange(L) >= t - window)[None, None, None, :])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    forward = _causal(_mha(ea.attention_fn(name, window=window), decode=False), x)
    np.testing.assert_allclose(ours, forward, rtol=1e-5, atol=1e-5)
    # a window relative to the slot would see slots 0..w only: the late tokens would differ
    slot_window = _decode(_mha(), x, masks=lambda t: (jnp.arange(L) <= window)[None, None, None, :])
    assert not np.allclose(ours[:, window + 2:], slot_window[:, window + 2:], atol=1e-3)


@pytest.mark.parametrize("name", FREE_DECODERS)
def test_decoding_on_flax_cache_equals_causal_forward(name):
    setting = ea.get_spec(name).pattern_setting
    x = _x(3)
    ours = _decode(_mha(ea.attention_fn(name, **setting)), x)
    forward = _causal(_mha(ea.attention_fn(name, **setting), decode=False), x)
    np.testing.assert_allclose(ours, forward, rtol=2e-5, atol=2e-5, err_msg=f"{name} on flax's cache")


@pytest.mark.skipif(not NO_DECODE_NO_CROSS, reason="no such variant registered")
def test_variant_that_cannot_decode_refuses_flax_decode_mode():
    mha = _mha(ea.attention_fn(NO_DECODE_NO_CROSS[0]))
    mha.init_cache((B, L, F))
    with pytest.raises(ea.CapabilityError, match="decode"):
        mha(_x()[:, :1])
