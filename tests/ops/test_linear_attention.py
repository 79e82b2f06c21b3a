"""The linear-attention engine against its references, forward and backward.

References (efficient_attn/ops/reference/linear.py, written independently of the engine):
  quadratic: W = phi(Q) (phi(K) * exp(l))^T, masked (causal, kv_mask) by zeroing, then
             out = W V / (rowsum W + eps) where rowsum W > 0, else 0;
  recurrent: token by token, S_t = S_{t-1} + phi(k_t) v_t^T, z_t = z_{t-1} + phi(k_t),
             out_t = phi(q_t) S_t / (phi(q_t) z_t + eps)   (causal only).
Gradients are compared by name (dphi_q, dphi_k, dv, dlog_scale). Everything is jitted once
per configuration (eager dispatch of a scan is slow on 2 cores).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, random_arrays, tiered
from efficient_attn.ops.linear_attention import linear_attention as _engine
from efficient_attn.ops.reference.linear import linear_attention_quadratic, linear_attention_recurrent

B, H, F, DV = 2, 2, 6, 5
_STATIC = ("causal", "eps", "chunk_size")
engine = jax.jit(_engine, static_argnames=_STATIC)


def _inputs(T, S, seed=0, positive=True):
    phi_q, phi_k, v, log_scale = random_arrays(seed, (B, T, H, F), (B, S, H, F), (B, S, H, DV), (B, S, H))
    if positive:  # positive features (as linear / performer), so every denominator is > 0
        phi_q, phi_k = jnp.exp(0.5 * phi_q), jnp.exp(0.5 * phi_k)
    # log scales on a 1/64 grid: adding a large integer to them is exact in float32
    log_scale = jnp.round(128.0 * log_scale) / 64.0
    return phi_q, phi_k, v, log_scale


def _kv_mask(S, seed=1):
    m = np.random.default_rng(seed).random((B, S)) > 0.35
    m[1, :4] = False  # the first queries of batch 1 see nothing under causal masking
    return jnp.asarray(m)


# the references (efficient_attn/ops/reference/linear.py), each jitted once per configuration
quadratic_ref = jax.jit(linear_attention_quadratic, static_argnames=("causal", "eps"))
recurrent_ref = jax.jit(linear_attention_recurrent, static_argnames=("eps",))


def _grads(fn, w, phi_q, phi_k, v, log_scale, **kw):
    """d/d(phi_q, phi_k, v, log_scale) of sum(out * w), jitted."""

    def loss(a, b, c, l):
        return jnp.sum(fn(a, b, c, k_log_scale=l, **kw) * w)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(phi_q, phi_k, v, log_scale)


CASES = tiered([
    # (T, S, causal, use_kv_mask, chunk, log_scale); the first three run in CI
    (37, 37, True, False, 8, False),  # 37 = 4 chunks of 8 + 5: padding inside the engine
    (23, 41, False, True, 8, False),  # cross attention
    (37, 37, True, True, 8, True),
    (37, 37, False, True, 8, True),
    (21, 21, True, True, 64, False),  # one chunk, shorter than chunk_size
    (9, 9, True, False, 1, True),  # chunks of one token
], ci=3)


@pytest.mark.parametrize("T,S,causal,use_kv,chunk,scaled", CASES)
def test_engine_matches_quadratic_reference_forward_and_backward(T, S, causal, use_kv, chunk, scaled):
    phi_q, phi_k, v, ls = _inputs(T, S)
    kv_mask = _kv_mask(S) if use_kv else None
    eps = 0.0 if scaled else 1e-3  # eps is refused with log scales (see the engine)
    kw = dict(causal=causal, kv_mask=kv_mask, eps=eps)
    ls = ls if scaled else jnp.zeros_like(ls)
    got = engine(phi_q, phi_k, v, k_log_scale=ls if scaled else None, chunk_size=chunk, **kw)
    want = quadratic_ref(phi_q, phi_k, v, k_log_scale=ls if scaled else None, **kw)
    assert_close("out", got, want, rtol=2e-5, atol=2e-6)

    w = jax.random.normal(jax.random.key(5), want.shape)
    if scaled:
        g_got = _grads(functools.partial(_engine, chunk_size=chunk), w, phi_q, phi_k, v, ls, **kw)
    else:  # without log scales: the engine's unscaled path (gradient w.r.t. l is then 0 for both)
        plain = lambda a, b, c, k_log_scale, **k: _engine(a, b, c, chunk_size=chunk, **k)  # noqa: E731
        g_got = _grads(plain, w, phi_q, phi_k, v, ls, **kw)[:3] + (jnp.zeros_like(ls),)
    if scaled:
        g_want = _grads(quadratic_ref, w, phi_q, phi_k, v, ls, **kw)
    else:  # the reference takes no log scale with eps > 0 (as the engine)
        plain_ref = lambda a, b, c, k_log_scale, **k: quadratic_ref(a, b, c, **k)  # noqa: E731
        g_want = _grads(plain_ref, w, phi_q, phi_k, v, ls, **kw)[:3] + (jnp.zeros_like(ls),)
    for name, a, b in zip(("dphi_q", "dphi_k", "dv", "dlog_scale"), g_got, g_want):
        assert_close(name, a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_kv", [False, True])
def test_causal_engine_matches_recurrent_reference(use_kv):
    T = 29
    phi_q, phi_k, v, _ = _inputs(T, T, seed=3)
    kv_mask = _kv_mask(T) if use_kv else None
    got = engine(phi_q, phi_k, v, causal=True, kv_mask=kv_mask, eps=1e-6, chunk_size=8)
    want = recurrent_ref(phi_q, phi_k, v, kv_mask=kv_mask, eps=1e-6)
    assert_close("out", got, want, rtol=2e-5, atol=2e-6)
    w = jax.random.normal(jax.random.key(2), want.shape)
    g1 = jax.jit(jax.grad(lambda a, b, c: jnp.sum(_engine(a, b, c, causal=True, kv_mask=kv_mask, chunk_size=8) * w),
                          argnums=(0, 1, 2)))(phi_q, phi_k, v)
    g2 = jax.jit(jax.grad(lambda a, b, c: jnp.sum(recurrent_ref(a, b, c, kv_mask=kv_mask) * w),
                          argnums=(0, 1, 2)))(phi_q, phi_k, v)
    for name, a, b in zip(("dphi_q", "dphi_k", "dv"), g1, g2):
        assert_close(name, a, b, rtol=1e-4, atol=1e-5)


def test_empty_rows_are_zero_and_masked_keys_cannot_leak_nan():
    T = 20
    phi_q, phi_k, v, ls = _inputs(T, T, seed=4)
    kv_mask = _kv_mask(T)
    hidden = ~kv_mask[:, :, None, None]
    bad_k = jnp.where(hidden, jnp.nan, phi_k)
    bad_v = jnp.where(hidden, jnp.inf, v)
    bad_l = jnp.where(~kv_mask[:, :, None], jnp.nan, ls)
    for causal in (False, True):
        for scaled in (False, True):
            ref = engine(phi_q, phi_k, v, causal=causal, kv_mask=kv_mask, k_log_scale=ls if scaled else None, chunk_size=8)
            out = engine(phi_q, bad_k, bad_v, causal=causal, kv_mask=kv_mask,
                         k_log_scale=bad_l if scaled else None, chunk_size=8)
            np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
            assert bool(jnp.all(jnp.isfinite(out)))
            if causal:  # batch 1: keys 0..3 masked -> queries 0..3 see nothing
                np.testing.assert_array_equal(np.asarray(out[1, :4]), 0.0)
    nothing = jnp.zeros((B, T), bool)
    np.testing.assert_array_equal(np.asarray(engine(phi_q, phi_k, v, kv_mask=nothing, eps=1e-6)), 0.0)
    g = jax.jit(jax.grad(lambda a: jnp.sum(_engine(a, phi_k, v, kv_mask=nothing))))(phi_q)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_log_scale_is_exactly_a_rescaling_and_survives_overflow():
    """Log scales whose exp overflows float32 give the output of small ones; no NaN in grads."""
    T = 26
    phi_q, phi_k, v, ls = _inputs(T, T, seed=6)
    for causal in (False, True):
        small = engine(phi_q, phi_k, v, causal=causal, k_log_scale=ls, chunk_size=8)
        huge = engine(phi_q, phi_k, v, causal=causal, k_log_scale=ls + 512.0, chunk_size=8)
        np.testing.assert_allclose(huge, small, rtol=1e-6, atol=1e-7)
        # one key far above the others dominates every query that sees it
        spike = ls.at[:, 10].add(300.0)
        out = engine(phi_q, phi_k, v, causal=causal, k_log_scale=spike, chunk_size=8)
        assert bool(jnp.all(jnp.isfinite(out)))
        g = jax.jit(jax.grad(lambda l: jnp.sum(_engine(phi_q, phi_k, v, causal=causal, k_log_scale=l, chunk_size=8))))(spike)
        assert bool(jnp.all(jnp.isfinite(g)))
        seen = slice(10, None) if causal else slice(None)
        np.testing.assert_allclose(out[:, seen], jnp.broadcast_to(v[:, 10:11], out[:, seen].shape), rtol=1e-5, atol=1e-6)


def test_causal_outputs_ignore_the_future_bit_for_bit():
    T, cut = 30, 13  # the cut falls inside a chunk of 8
    phi_q, phi_k, v, ls = _inputs(T, T, seed=7)
    q2, k2, v2, l2 = _inputs(T, T, seed=8)
    fut = (jnp.arange(T) >= cut)[None, :, None]
    for scaled in (False, True):  # future keys with far larger scales than the past ones
        kw = dict(causal=True, chunk_size=8)
        a = engine(phi_q, phi_k, v, k_log_scale=ls if scaled else None, **kw)
        b = engine(jnp.where(fut[..., None], q2, phi_q), jnp.where(fut[..., None], k2, phi_k),
                   jnp.where(fut[..., None], v2, v), k_log_scale=jnp.where(fut, l2 + 50.0, ls) if scaled else None, **kw)
        np.testing.assert_array_equal(np.asarray(a[:, :cut]), np.asarray(b[:, :cut]))
        assert not np.allclose(a[:, cut:], b[:, cut:])


def test_signed_features_and_cancelling_denominators_stay_finite():
    """Features of either sign (cosformer's sin/cos parts): a denominator <= 0 gives 0, not inf."""
    T = 21
    phi_q, phi_k, v, _ = _inputs(T, T, seed=9, positive=False)
    for causal in (False, True):
        out = engine(phi_q, phi_k, v, causal=causal, eps=1e-6, chunk_size=8)
        want = quadratic_ref(phi_q, phi_k, v, causal=causal, eps=1e-6)
        assert bool(jnp.all(jnp.isfinite(out)))
        raw = jnp.einsum("bthf,bshf->bths", phi_q, phi_k)
        if causal:
            raw = jnp.where(jnp.tril(jnp.ones((T, T), bool))[None, :, None, :], raw, 0.0)
        den = jnp.sum(raw, axis=-1)[..., None]
        np.testing.assert_array_equal(np.asarray(jnp.where(den <= 0, out, 0.0)), 0.0)
        safe = den > 0.5  # where the denominator is comfortably away from 0 both agree
        assert float(jnp.mean(safe)) > 0.2
        np.testing.assert_allclose(jnp.where(safe, out, 0), jnp.where(safe, want, 0), rtol=1e-3, atol=1e-4)


def test_bfloat16_inputs_are_accumulated_in_float32():
    T = 200
    phi_q, phi_k, v, ls = _inputs(T, T, seed=10)
    for causal in (False, True):
        ref = engine(phi_q, phi_k, v, causal=causal, k_log_scale=ls, chunk_size=32)
        low = engine(*(x.astype(jnp.bfloat16) for x in (phi_q, phi_k, v)), causal=causal,
                     k_log_scale=ls, chunk_size=32)
        assert low.dtype == jnp.float32
        err = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
        assert err < 2e-2, err  # only the inputs are rounded (bf16 keeps 8 bits of mantissa)


def test_rejects_causal_cross_and_eps_with_log_scale():
    phi_q, phi_k, v, ls = _inputs(5, 7)
    with pytest.raises(ValueError, match="T == S"):
        _engine(phi_q, phi_k, v, causal=True)
    with pytest.raises(ValueError, match="eps"):
        _engine(phi_q, phi_k, v, k_log_scale=ls, eps=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_returned_denominator_is_the_visible_feature_sum(causal):
    """return_denominator gives sum_j phi(q_i) . phi(k_j) over the keys query i sees (the
    causal prefix, kv_mask applied), from the same pass as the unchanged output."""
    T = 11
    phi_q, phi_k, v, _ = _inputs(T, T, seed=3)
    mask = _kv_mask(T)
    out, den = jax.jit(functools.partial(_engine, causal=causal, kv_mask=mask, chunk_size=4,
                                         return_denominator=True))(phi_q, phi_k, v)
    w = jnp.einsum("bthf,bshf->bhts", phi_q, phi_k) * mask[:, None, None, :]
    if causal:
        w = w * jnp.tril(jnp.ones((T, T)))
    assert_close("den", den, jnp.sum(w, axis=-1).transpose(0, 2, 1), rtol=1e-5, atol=1e-6)
    assert_close("out", out, engine(phi_q, phi_k, v, causal=causal, kv_mask=mask, chunk_size=4), rtol=1e-6, atol=1e-7)


def test_returned_denominator_refuses_log_scales():
    phi_q, phi_k, v, log_scale = _inputs(5, 5)
    with pytest.raises(ValueError, match="return_denominator needs k_log_scale=None"):
        _engine(phi_q, phi_k, v, k_log_scale=log_scale, return_denominator=True)
