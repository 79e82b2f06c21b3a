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
from conformance.harness import VARIANTS, as_claimed, caps

H, HKV, D, T = 4, 2, 16, 24


def _pair(variant):
    """(GQA module, MHA module) with the same parameters: both built from nnx.Rngs(0)."""
    gqa = ea.build(variant, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(0), num_kv_heads=HKV)
    mha = ea.build(variant, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(0))
    return gqa, mha


def _out_and_grads(module, name):
    """One jitted program: (out, (dq, dk, dv)) of sum(out * w), forward and backward together."""
    graphdef, state = nnx.split(module)

    def loss(q, k, v, mask, w):
        out = nnx.merge(graphdef, state, copy=True)(q, k, v, mask=as_claimed(name, mask))
        return jnp.sum(out * w), out

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(lambda q, k, v, mask, w: grad(q, k, v, mask, w)[::-1])


def _group_sum(g):  # [B, S, H, D] gradient of the repeated k -> [B, S, Hkv, D]
    return g.reshape(g.shape[:2] + (HKV, H // HKV) + g.shape[3:]).sum(3)


def _cases():
    """(variant, causal) for every variant claiming gqa: its first masking (causal where it
    claims causal) in CI, the other one, where it has one, in the slow tier (`make test-slow`)."""
    out = []
    for name in VARIANTS:
        c = caps(name)
        if not c.gqa:
            continue  # test_gqa_refused_without_capability
        first = bool(c.causal)
        out.append(pytest.param(name, first, id=f"{name}-{'causal' if first else 'bidir'}"))
        if first and c.bidirectional:
            out.append(pytest.param(name, False, id=f"{name}-bidir", marks=pytest.mark.slow))
    return out


@pytest.mark.parametrize("variant, causal", _cases())
def test_gqa_equals_repeated_kv(variant, causal):
    c = caps(variant)
    gqa, mha = _pair(variant)
    f_gqa, f_mha = _out_and_grads(gqa, variant), _out_and_grads(mha, variant)
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (2, T, H, D))
    k = jax.random.normal(keys[1], (2, T, HKV, D))
    v = jax.random.normal(keys[2], (2, T, HKV, D))
    w = jax.random.normal(keys[3], (2, T, H, D))
    kv_mask = jnp.ones((2, T), bool).at[1, T // 2:].set(False) if c.kv_mask else None
    mask = ea.Mask(causal=causal, kv_mask=kv_mask)
    rep = lambda x: jnp.repeat(x, H // HKV, axis=2)  # noqa: E731
    out_gqa, g_gqa = f_gqa(q, k, v, mask, w)
    out_mha, g_mha = f_mha(q, rep(k), rep(v), mask, w)
    assert_close("out", out_gqa, out_mha, rtol=2e-4, atol=2e-5)
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
