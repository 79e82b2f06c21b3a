"""Implied attention weights by probing, the metrics on them, and the pattern picture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn import patterns
from efficient_attn.ops.masks import dense_visibility, masked_softmax

H, D = 2, 8


def _qk(T, S=None, seed=0, scale=1.5):
    S = T if S is None else S
    kq, kk = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kq, (2, T, H, D)) * scale, jax.random.normal(kk, (2, S, H, D))


def _softmax_matrix(q, k, mask):
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.float32(D))
    return masked_softmax(logits, dense_visibility(mask, q.shape[0], q.shape[1], k.shape[1]))


@pytest.mark.parametrize(
    "T,S,causal,masked",
    [(37, 37, False, False), (37, 37, True, True), (20, 29, False, True)],  # S not a multiple of D; cross
)
def test_full_recovers_its_softmax_matrix(T, S, causal, masked):
    q, k = _qk(T, S)
    kv = None
    if masked:
        kv = np.ones((2, S), bool)
        kv[0, 3:9] = False
        kv[1] = False  # every key masked: all-zero rows
    mask = ea.Mask(causal=causal, kv_mask=kv)
    full = ea.build("full", num_heads=H, head_dim=D, max_len=64)
    a = patterns.implied_weights(full, q, k, mask)
    assert a.shape == (2, H, T, S)
    np.testing.assert_allclose(a, _softmax_matrix(q, k, mask), atol=1e-6)
    sums = np.asarray(a.sum(-1))
    np.testing.assert_allclose(sums[0], 1.0, atol=1e-5)  # every visible row is a distribution
    if masked:
        assert np.all(np.asarray(a[1]) == 0) and np.all(np.asarray(a[0, :, :, 3:9]) == 0)
    if causal:
        assert np.all(np.triu(np.asarray(a[0, 0]), k=1) == 0)


def test_probe_of_a_sparse_variant_shows_its_support():
    if "local" not in ea.list_variants():
        pytest.skip("local is not registered")
    q, k = _qk(40)
    a = np.asarray(patterns.implied_weights(ea.build("local", num_heads=H, head_dim=D, max_len=64, window=3), q, k))
    i, j = np.indices((40, 40))
    assert np.all(a[:, :, np.abs(i - j) > 3] == 0)
    assert np.all(a[:, :, np.abs(i - j) <= 3] > 0)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)


def test_probe_consistency_detects_outputs_that_are_not_linear_in_v():
    full = ea.build("full", num_heads=H, head_dim=D, max_len=64)
    q, k = _qk(24)
    v = jax.random.normal(jax.random.key(5), k.shape)
    a = patterns.implied_weights(full, q, k)
    assert patterns.probe_consistency(a, v, full(q, k, v)) < 1e-5

    def affine(q, k, v, *, mask=None):  # out = A V + 1: not linear in V
        return full(q, k, v, mask=mask) + 1.0

    a2 = patterns.implied_weights(affine, q, k)
    assert patterns.probe_consistency(a2, v, affine(q, k, v)) > 0.1


def test_kl_and_distribution_checks():
    q, k = _qk(16)
    p = np.asarray(_softmax_matrix(q, k, None))
    assert patterns.row_kl(p, p) < 1e-6  # only the 1e-6 smoothing
    uniform = np.full_like(p, 1 / 16)
    kl = patterns.row_kl(p, uniform)
    want = np.mean(np.sum(p * (np.log(p) - np.log(1 / 16)), -1))
    np.testing.assert_allclose(kl, want, rtol=1e-5)
    # a variant that never sees the last key: finite, about log(1/eps) per unit of p's mass there
    cut = p.copy()
    cut[..., -1] = 0
    cut /= cut.sum(-1, keepdims=True)
    kl_cut = patterns.row_kl(p, cut)
    assert np.isfinite(kl_cut) and kl_cut > np.mean(p[..., -1]) * 0.9 * np.log(1 / patterns.KL_SMOOTHING)
    assert patterns.is_distribution(p, p) and patterns.negative_mass(p, p) == 0
    signed = p.copy()
    signed[..., 0] -= 0.2
    signed[..., 1] += 0.2
    assert not patterns.is_distribution(signed, p)
    assert patterns.negative_mass(signed, p) > 0
    # rows that full cannot see (all masked) are ignored
    p_masked = p.copy()
    p_masked[1] = 0
    assert patterns.is_distribution(np.where(p_masked > 0, p, 0.0), p_masked)


def test_structured_input_has_a_diagonal_and_the_picture_is_written(tmp_path):
    q, k = patterns.structured_qk(32, H, 32)  # the sweep's head width
    full = ea.build("full", num_heads=H, head_dim=32, max_len=32)
    a = np.asarray(patterns.implied_weights(full, q, k))[0, 0]
    i, j = np.indices(a.shape)
    near, far = a[np.abs(i - j) <= 2].sum() / 32, a[np.abs(i - j) > 8].sum() / 32
    assert near > 0.3 and far > 0.03, (near, far)  # a band around the diagonal, plus long-range weight
    panels = {
        "full": {"bidirectional": a, "causal": np.tril(a)},
        "other": {"bidirectional": a - 0.01, "causal": "no causal mode", "label": "x=1"},
    }
    path = patterns.draw_patterns(tmp_path / "p.png", panels, columns=2, title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
