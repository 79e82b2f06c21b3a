"""The online-softmax (blockwise) engine: agreement with the dense softmax reference forward and
backward (dq, dk, dv by name), blockings, refusals, zero rows, skipped blocks, O(N) memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from conftest import assert_close, random_arrays, tiered
from efficient_attn.ops.online_softmax import blockwise_attention
from efficient_attn.ops.reference.softmax import softmax_attention

CASES = tiered([
    # T, S, causal, kv_mask, block_size; the first two (CI) cover cross lengths, causal, kv_mask
    (37, 53, False, True, 16),
    (64, 64, True, True, 16),
    (37, 37, False, False, 8),
    (37, 37, True, False, 8),
    (40, 40, True, True, 64),  # one block
    (5, 300, False, True, 32),
], ci=2)


def _data(T, S, kv, seed=0):
    q, k, v, w = random_arrays(seed, (2, T, 3, 8), (2, S, 3, 8), (2, S, 3, 8), (2, T, 3, 8))  # w: a cotangent
    m = None
    if kv:
        m = np.random.default_rng(seed).random((2, S)) > 0.4
        m[1, : S // 2] = False
        m = jnp.asarray(m)
    return q, k, v, w, m


@pytest.mark.parametrize("T,S,causal,kv,bs", CASES)
def test_forward_and_backward_match_dense_reference(T, S, causal, kv, bs):
    q, k, v, w, m = _data(T, S, kv)
    mask = ea.Mask(causal=causal, kv_mask=m)

    def ours(q, k, v):
        return jnp.sum(blockwise_attention(q, k, v, causal=causal, kv_mask=m, block_size=bs) * w)

    def ref(q, k, v):
        return jnp.sum(softmax_attention(q, k, v, mask) * w)

    assert_close("out", blockwise_attention(q, k, v, causal=causal, kv_mask=m, block_size=bs),
                 softmax_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    grads = zip(("dq", "dk", "dv"), jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v))
    for name, g_ours, g_ref in grads:
        assert_close(name, g_ours, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T,causal,block,bwd_block", tiered([(37, True, 24, 16), (50, False, 16, 7), (37, True, 16, 24),
                                                             (64, True, 32, 8)], ci=2))
def test_mixed_blockings_match_dense_reference(T, causal, block, bwd_block):
    """Forward and backward blocks of different, non-dividing sizes; causal tiles straddle the diagonal."""
    q, k, v, w, m = _data(T, T, True)
    mask = ea.Mask(causal=causal, kv_mask=m)

    def ours(q, k, v):
        return jnp.sum(blockwise_attention(q, k, v, causal=causal, kv_mask=m, block_size=block,
                                           backward_query_block=bwd_block) * w)

    def ref(q, k, v):
        return jnp.sum(softmax_attention(q, k, v, mask) * w)

    grads = zip(("dq", "dk", "dv"), jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v))
    for name, g_ours, g_ref in grads:
        assert_close(name, g_ours, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length,block,expected", [(4096, 1024, 1024), (1100, 1024, 552), (37, 1024, 37),
                                                   (37, 16, 16), (300, 256, 152), (5, 4, 3)])
def test_balanced_block(length, block, expected):
    from efficient_attn.ops.online_softmax import balanced_block
    assert balanced_block(length, block) == expected


def test_causal_cross_lengths_refused():
    q, k, v, _, _ = _data(48, 32, False)
    with pytest.raises(ValueError, match="T == S"):
        blockwise_attention(q, k, v, causal=True, block_size=16)


def test_fully_masked_rows_have_zero_output_and_gradient():
    q, k, v, w, _ = _data(16, 16, False)
    m = jnp.zeros((2, 16), bool).at[0].set(True)
    g = jax.grad(lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, kv_mask=m, block_size=4) * w), (0, 1, 2))(q, k, v)
    out = blockwise_attention(q, k, v, kv_mask=m, block_size=4)
    assert np.all(np.asarray(out[1]) == 0) and np.all(np.isfinite(np.asarray(out)))
    for x in g:
        assert np.all(np.isfinite(np.asarray(x)))
        assert np.all(np.asarray(x[1]) == 0)


def _temp_bytes(fn, n, H=2, D=16):
    spec = jax.ShapeDtypeStruct((1, n, H, D), jnp.float32)
    g = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), (0, 1, 2))
    return jax.jit(g).lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes


def test_linear_memory_forward_backward():
    """Compile only: blockwise fwd+bwd temp memory is linear in N; dot_product_attention's quadratic."""
    bw = lambda q, k, v: blockwise_attention(q, k, v, block_size=256)  # noqa: E731
    growth = _temp_bytes(bw, 8192) / _temp_bytes(bw, 2048)
    assert growth < 5, f"blockwise fwd+bwd temp memory grew {growth:.1f}x for 4x N"
    assert _temp_bytes(bw, 8192) < 0.05 * _temp_bytes(jax.nn.dot_product_attention, 8192)


def test_causal_skips_blocks_above_diagonal():
    """Skipped, not masked: NaN values in key blocks after the diagonal never reach earlier outputs.

    A masked implementation computes 0 * NaN = NaN in P V for those blocks; a skipped block is never read.
    """
    bs, T = 16, 64
    q, k, v, w, _ = _data(T, T, False)
    poisoned = v.at[:, bs:].set(jnp.nan)  # every key block after the first
    out = blockwise_attention(q, k, poisoned, causal=True, block_size=bs, backward_query_block=bs)
    ref = softmax_attention(q, k, v, ea.Mask(causal=True))
    np.testing.assert_allclose(out[:, :bs], ref[:, :bs], rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda q, k: jnp.sum(
        blockwise_attention(q, k, poisoned, causal=True, block_size=bs, backward_query_block=bs)[:, :bs]), (0, 1))
    dq, dk = g(q, k)
    assert np.all(np.isfinite(np.asarray(dq[:, :bs])))
