"""Grouped-query attention over every registered variant: honoured (gqa) or refused.

A variant with ``capabilities.gqa`` run on k, v of Hkv < H heads equals the same variant
(same parameters) run on k, v repeated per query head, forward and backward; the gradient
of a shared kv head is the sum over its group of the repeated run's gradients (dk, dv by
name). A variant without it refuses at build and at call with a CapabilityError naming gqa.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import efficient_attn as ea
from conftest import assert_close
from conformance.harness import as_claimed, caps

H, HKV, D, T = 4, 2, 16, 24


def _pair(variant):
    """(GQA module, MHA module) with the same parameters: both built from nnx.Rngs(0)."""
    gqa = ea.build(variant, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(0), num_kv_heads=HKV)
    mha = ea.build(variant, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(0))
    return gqa, mha


def _fn(module, name):
    graphdef, state = nnx.split(module)
    return jax.jit(lambda q, k, v, mask: nnx.merge(graphdef, state, copy=True)(q, k, v, mask=as_claimed(name, mask)))


def _group_sum(g):  # [B, S, H, D] gradient of the repeated k -> [B, S, Hkv, D]
    return g.reshape(g.shape[:2] + (HKV, H // HKV) + g.shape[3:]).sum(3)


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_repeated_kv(variant, causal):
    c = caps(variant)
    if not c.gqa:
        pytest.skip(f"{variant} does not claim gqa (refusal checked below)")
    if causal and not c.causal:
        pytest.skip(f"{variant} is not causal")
    if not causal and not c.bidirectional:
        pytest.skip(f"{variant} is causal only")
    gqa, mha = _pair(variant)
    f_gqa, f_mha = _fn(gqa, variant), _fn(mha, variant)
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (2, T, H, D))
    k = jax.random.normal(keys[1], (2, T, HKV, D))
    v = jax.random.normal(keys[2], (2, T, HKV, D))
    w = jax.random.normal(keys[3], (2, T, H, D))
    kv_mask = jnp.ones((2, T), bool).at[1, T // 2:].set(False) if c.kv_mask else None
    mask = ea.Mask(causal=causal, kv_mask=kv_mask)
    rep = lambda x: jnp.repeat(x, H // HKV, axis=2)  # noqa: E731
    assert_close("out", f_gqa(q, k, v, mask), f_mha(q, rep(k), rep(v), mask), rtol=2e-4, atol=2e-5)
    g_gqa = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f_gqa(q, k, v, mask) * w), (0, 1, 2)))(q, k, v)
    g_mha = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f_mha(q, k, v, mask) * w), (0, 1, 2)))(q, rep(k), rep(v))
    assert_close("dq", g_gqa[0], g_mha[0], rtol=1e-3, atol=1e-4)
    assert_close("dk", g_gqa[1], _group_sum(g_mha[1]), rtol=1e-3, atol=1e-4)
    assert_close("dv", g_gqa[2], _group_sum(g_mha[2]), rtol=1e-3, atol=1e-4)


def test_gqa_refused_without_capability(variant):
    if caps(variant).gqa:
        pytest.skip(f"{variant} claims gqa")
    with pytest.raises(ea.CapabilityError, match="gqa"):
        ea.build(variant, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(0), num_kv_heads=HKV)
    module = ea.build(variant, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(0))
    q = jnp.zeros((1, 8, H, D))
    kv = jnp.zeros((1, 8, HKV, D))
    with pytest.raises((ea.CapabilityError, ValueError), match="gqa|num_kv_heads"):
        module(q, kv, kv, mask=as_claimed(variant, None))
