"""Variants that claim ``exact`` equal "full" (the readable einsum softmax) on odd sizes,
forward and backward; every variant equals full at its declared exact-limit setting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from conformance.harness import MAX_LEN, B, D, H, caps, jitted, pure, qkv

REFERENCE = ea.registry.exact_reference()  # the ground truth of every exact path ("full")

CASES = [
    # (T, S, causal, kv_mask)
    (37, 37, False, False),
    (37, 37, True, False),
    (37, 37, False, True),
    (37, 37, True, True),
    (37, 53, False, False),
    (37, 53, False, True),
]


def _kv_mask(S, seed=1):
    m = np.random.default_rng(seed).random((B, S)) > 0.3
    m[:, 0] = True
    return m


@pytest.mark.parametrize("T,S,causal,use_kv", CASES)
def test_exact_matches_full(variant, T, S, causal, use_kv):
    c = caps(variant)
    if not c.exact:
        pytest.skip(f"{variant} is approximate")
    if (causal and not c.causal) or (use_kv and not c.kv_mask) or (T != S and not c.cross):
        pytest.skip(f"{variant} does not claim this case")
    q, k, v = qkv(T, S)
    mask = ea.Mask(causal=causal, kv_mask=_kv_mask(S) if use_kv else None)
    want = jitted(REFERENCE)(q, k, v, mask)
    got = jitted(variant)(q, k, v, mask)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def _grads(fn, q, k, v, mask, w):
    """(dq, dk, dv) of sum(out * w): a fixed random cotangent, so every output element counts."""
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * w), argnums=(0, 1, 2))(q, k, v)


def assert_grads_close(variant, got, want, rtol=1e-3, atol=1e-4):
    for name, g, r in zip(("dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol, err_msg=f"{variant}: {name} differs from full's")


GRAD_CASES = [(37, 37, False, True), (37, 37, True, True), (37, 53, False, True)]


@pytest.mark.parametrize("T,S,causal,use_kv", GRAD_CASES)
def test_exact_gradients_match_full(variant, T, S, causal, use_kv):
    """An exact variant's gradients with respect to q, k and v are full's, each by name."""
    c = caps(variant)
    if not c.exact:
        pytest.skip(f"{variant} is approximate")
    if (causal and not c.causal) or (use_kv and not c.kv_mask) or (T != S and not c.cross):
        pytest.skip(f"{variant} does not claim this case")
    q, k, v = qkv(T, S)
    w = jax.random.normal(jax.random.key(7), (B, T, H, D))
    mask = ea.Mask(causal=causal, kv_mask=_kv_mask(S) if use_kv else None)
    assert_grads_close(variant, _grads(jitted(variant), q, k, v, mask, w), _grads(jitted(REFERENCE), q, k, v, mask, w))


LIMIT_N = 37


def _at_exact_limit(variant):
    spec = ea.get_spec(variant)
    if spec.exact_limit is None:
        pytest.skip(f"{variant} declares no exact-limit setting")
    setting = spec.exact_limit(LIMIT_N)
    return jax.jit(pure(ea.build(variant, num_heads=H, head_dim=D, max_len=MAX_LEN, **setting))), setting


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_exact_limit_equals_full_forward_and_backward(variant, causal):
    """At the setting its registration declares exact (window >= N, one block, ...), a variant
    is full attention: outputs and dq, dk, dv."""
    fn, setting = _at_exact_limit(variant)
    c = caps(variant)
    if (causal and not c.causal) or (not causal and not c.bidirectional):
        pytest.skip(f"{variant} does not claim this case")
    q, k, v = qkv(LIMIT_N)
    kv = _kv_mask(LIMIT_N) if c.kv_mask else None
    mask = ea.Mask(causal=causal, kv_mask=kv)
    if c.shared_qk:
        pytest.skip(f"{variant} attends with shared query-keys; its limit is checked in its own tests")
    np.testing.assert_allclose(fn(q, k, v, mask), jitted(REFERENCE)(q, k, v, mask), rtol=2e-4, atol=2e-5,
                               err_msg=f"{variant} at {setting}: output differs from full's")
    w = jax.random.normal(jax.random.key(7), (B, LIMIT_N, H, D))
    assert_grads_close(f"{variant} at {setting}", _grads(fn, q, k, v, mask, w), _grads(jitted(REFERENCE), q, k, v, mask, w))
