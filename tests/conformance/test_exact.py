"""Variants that claim ``exact`` equal "full" (the readable einsum softmax) on odd sizes."""

import numpy as np
import pytest

import efficient_attn as ea
from conformance.harness import B, caps, jitted, qkv

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
    want = jitted("full")(q, k, v, mask)
    got = jitted(variant)(q, k, v, mask)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
