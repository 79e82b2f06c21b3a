"""Masks are honoured: no causal leak, masked keys change nothing, empty rows give zeros."""

import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from conformance.harness import B, D, H, caps, jitted, qkv

T = 48
CUT = 20  # positions >= CUT are "the future" of positions < CUT


def _require(variant, *features):
    c = caps(variant)
    for f in features:
        if not getattr(c, f):
            pytest.skip(f"{variant} does not claim {f}")


def test_causal_no_leak(variant):
    _require(variant, "causal")
    q, k, v = qkv(T)
    f = jitted(variant)
    mask = ea.Mask(causal=True)
    base = f(q, k, v, mask)
    q2, k2, v2 = qkv(T, seed=99)
    fut = jnp.arange(T)[None, :, None, None] >= CUT
    changed = f(jnp.where(fut, q2, q), jnp.where(fut, k2, k), jnp.where(fut, v2, v), mask)
    np.testing.assert_allclose(changed[:, :CUT], base[:, :CUT], rtol=1e-5, atol=1e-6)
    assert not np.allclose(changed[:, CUT:], base[:, CUT:]), "future inputs changed nothing at all"


def _kv_mask():
    m = np.ones((B, T), bool)
    m[0, 5:17] = False
    m[0, 30:] = False
    m[1, :] = False  # second batch element: every key masked
    return m


def test_kv_mask_invariance_and_empty_rows(variant):
    _require(variant, "kv_mask")
    q, k, v = qkv(T)
    f = jitted(variant)
    m = _kv_mask()
    mask = ea.Mask(kv_mask=m)
    base = f(q, k, v, mask)
    _, k2, v2 = qkv(T, seed=42)
    hidden = jnp.asarray(~m)[:, :, None, None]
    changed = f(q, jnp.where(hidden, k2, k), jnp.where(hidden, v2, v), mask)
    np.testing.assert_allclose(changed[0], base[0], rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(base)))
    np.testing.assert_array_equal(np.asarray(base[1]), 0.0)


def test_causal_with_kv_mask_empty_row(variant):
    _require(variant, "causal", "kv_mask")
    q, k, v = qkv(T)
    m = np.ones((B, T), bool)
    m[:, :3] = False  # queries 0..2 see no real key under causal masking
    out = jitted(variant)(q, k, v, ea.Mask(causal=True, kv_mask=m))
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_array_equal(np.asarray(out[:, :3]), 0.0)


def test_q_mask_zeroes_outputs(variant):
    q, k, v = qkv(T)
    qm = np.ones((B, T), bool)
    qm[:, -7:] = False
    out = jitted(variant)(q, k, v, ea.Mask(q_mask=qm))
    np.testing.assert_array_equal(np.asarray(out[:, -7:]), 0.0)
    assert float(jnp.abs(out[:, :-7]).sum()) > 0


def test_refusals_are_clear(variant):
    c = caps(variant)
    q, k, v = qkv(T)
    f = ea.build(variant, num_heads=H, head_dim=D, max_len=128)
    causal = not c.bidirectional  # a causal-only variant is asked for everything else causally
    if not c.bidirectional:
        with pytest.raises(ea.CapabilityError, match=rf"{variant}.*bidirectional.*Mask\(causal=True\)"):
            f(q, k, v)
    if not c.causal:
        with pytest.raises(ValueError, match=variant):
            f(q, k, v, mask=ea.Mask(causal=True))
    if not c.kv_mask:
        with pytest.raises(ValueError, match="kv_mask"):
            f(q, k, v, mask=ea.Mask(causal=causal, kv_mask=np.ones((B, T), bool)))
    if not c.dense_mask:
        with pytest.raises(ValueError, match="dense"):
            f(q, k, v, mask=ea.Mask(causal=causal, dense=np.ones((B, H, T, T), bool)))
    if not c.cross:
        q2, k2, v2 = qkv(T, T + 5)
        with pytest.raises(ValueError, match="cross"):
            f(q2, k2, v2, mask=ea.Mask(causal=causal) if causal else None)


def test_cross_attention(variant):
    _require(variant, "cross")
    q, k, v = qkv(T, 53)
    out = jitted(variant)(q, k, v)
    assert out.shape == (B, T, H, D)
    assert bool(jnp.all(jnp.isfinite(out)))
