"""KV cache reads against the dense reference, forward and backward; writes and the ring buffer.

Reference: ``ops.reference.softmax.softmax_attention`` of the one query over the cache slots
with the same visibility (a dense mask). Both reads (``attend_dense``, and ``attend_blocks``
at block sizes of one slot, one that does not divide the cache, and one larger than it) are
compared on out and on the gradients dq, dk, dv by name, with grouped-query heads too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from conftest import assert_close, tiered
from efficient_attn.ops import kv_cache
from efficient_attn.ops.reference.softmax import softmax_attention

B, L, D = 2, 37, 8
FWD = dict(rtol=1e-5, atol=1e-5)
BWD = dict(rtol=1e-4, atol=1e-4)


def _cache(H_kv, seed=0):
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.standard_normal((B, L, H_kv, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, L, H_kv, D)), jnp.float32)
    valid = np.ones((B, L), bool)
    valid[0, [0, 3, 20]] = False
    valid[1, 30:] = False  # never written
    return k, v, jnp.asarray(valid)


def _reference(q_t, k, v, visible):
    """visible [B, 1, L] -> the dense reference's [B, 1, H, Dv] output, as [B, H, Dv]."""
    mask = ea.Mask(dense=visible[:, :, None, :])
    return softmax_attention(q_t[:, None], k, v, mask)[:, 0]


READS = tiered([  # (block: None = the dense read, query heads, kv heads, position); 3 in CI
    pytest.param(None, 4, 2, 0, id="dense-gqa-first"),
    pytest.param(16, 2, 2, L - 1, id="b16-last"),  # 37 slots: the last block overlaps the one before
    pytest.param(16, 4, 2, 20, id="b16-gqa-mid"),  # blocks past the position skipped
    pytest.param(None, 2, 2, L - 1, id="dense-last"),
    pytest.param(1, 2, 2, 6, id="b1"),
    pytest.param(64, 2, 2, 0, id="b64-first"),  # one block larger than the cache
], ci=3)


@pytest.mark.parametrize("block, H, H_kv, position", READS)
def test_reads_equal_reference_fwd_bwd(block, H, H_kv, position):
    k, v, valid = _cache(H_kv)
    q_t = jax.random.normal(jax.random.key(1), (B, H, D))
    cache = kv_cache.KVCache(k=k, v=v, valid=valid)
    p = jnp.asarray(position, jnp.int32)

    def fast(q_t, k, v):
        c = kv_cache.KVCache(k=k, v=v, valid=valid)
        if block is None:
            return kv_cache.attend_dense(q_t, k, v, kv_cache.causal_visible(c, p))
        return kv_cache.attend_blocks(q_t, c, p, block=block)

    def slow(q_t, k, v):
        return _reference(q_t, k, v, kv_cache.causal_visible(cache, p))

    w = jax.random.normal(jax.random.key(2), (B, H, D))
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)  # noqa: E731
    assert_close("out", jax.jit(fast)(q_t, k, v), slow(q_t, k, v), **FWD)
    got = jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2)))(q_t, k, v)
    want = jax.jit(jax.grad(loss(slow), argnums=(0, 1, 2)))(q_t, k, v)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(name, a, b, **BWD)


@pytest.mark.parametrize("block", [None, 4])
def test_nothing_visible_is_zero_and_invisible_nan_never_leaks(block):
    k, v, valid = _cache(2)
    valid = valid.at[0, :3].set(False)
    k = k.at[:, 10].set(jnp.nan)  # slot 10: past the position, invisible
    v = v.at[0, 1].set(jnp.inf)  # an invalid slot of row 0
    cache = kv_cache.KVCache(k=k, v=v, valid=valid)
    q_t = jax.random.normal(jax.random.key(1), (B, 2, D))
    p = jnp.asarray(2, jnp.int32)
    out = (kv_cache.attend_dense(q_t, k, v, kv_cache.causal_visible(cache, p)) if block is None
           else kv_cache.attend_blocks(q_t, cache, p, block=block))
    assert bool(jnp.all(out[0] == 0)), "row 0 sees no slot: zeros"
    assert bool(jnp.all(jnp.isfinite(out[1])))


def test_a_nonfinite_visible_value_poisons_its_row_only():
    k, v, valid = _cache(2)
    v = v.at[1, 2].set(jnp.nan)
    cache = kv_cache.KVCache(k=k, v=v, valid=valid)
    q_t = jax.random.normal(jax.random.key(1), (B, 2, D))
    for p, poisoned in ((1, False), (4, True)):
        p = jnp.asarray(p, jnp.int32)
        for out in (kv_cache.attend_dense(q_t, k, v, kv_cache.causal_visible(cache, p)),
                    kv_cache.attend_blocks(q_t, cache, p, block=3)):
            assert bool(jnp.all(jnp.isfinite(out[0])))
            assert bool(jnp.all(jnp.isnan(out[1]))) == poisoned


def test_write_zeroes_padding_and_clamps_like_dynamic_update_slice():
    c = kv_cache.init_cache(B, 6, 2, D, D, jnp.bfloat16)
    k = jnp.full((B, 3, 2, D), jnp.nan)
    real = jnp.asarray([[True, False, True], [False, False, True]])
    c = jax.jit(kv_cache.write)(c, k, k, jnp.asarray(2), real)
    assert c.k.dtype == jnp.bfloat16
    np.testing.assert_array_equal(c.valid, [[0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 1, 0]])
    assert bool(jnp.all(c.k[0, 3] == 0)) and bool(jnp.all(jnp.isnan(c.k[0, 2].astype(jnp.float32))))
    late = kv_cache.write(c, jnp.ones((B, 1, 2, D)), jnp.ones((B, 1, 2, D)), 99)
    assert bool(jnp.all(late.valid[:, 5])), "a start past the end writes the last slot"
    off = kv_cache.write(c, jnp.ones((B, 1, 2, D)), jnp.ones((B, 1, 2, D)), 0, enabled=jnp.asarray(False))
    np.testing.assert_array_equal(off.valid, c.valid)


@pytest.mark.parametrize("T", [1, 3, 4, 9])
def test_ring_holds_the_last_slots_positions(T):
    W = 4
    ring = kv_cache.init_ring(1, W, 1, 2, 2, jnp.float32)
    k = jnp.arange(T, dtype=jnp.float32)[None, :, None, None] * jnp.ones((1, T, 1, 2))
    real = jnp.ones((1, T), bool).at[0, T - 1].set(False)
    ring = kv_cache.ring_fill(ring, k, k, real)
    held = sorted(int(p) for p in ring.pos if p >= 0)
    assert held == list(range(max(0, T - W), T))
    for slot in range(W):
        p = int(ring.pos[slot])
        if p >= 0:
            assert p % W == slot
            assert bool(ring.valid[0, slot]) == (p != T - 1)
            assert float(ring.k[0, slot, 0, 0]) == (p if p != T - 1 else 0.0)
    # pushing position T evicts position T - W (when held) and takes its slot
    old_k, _, live, was = kv_cache.ring_slot(ring, jnp.asarray(T))
    assert int(was) == (T - W if T >= W else -1) and bool(live[0]) == (T >= W and T - W != T - 1)
    ring = kv_cache.ring_push(ring, jnp.full((1, 1, 2), 7.0), jnp.full((1, 1, 2), 7.0), jnp.asarray(T))
    assert int(ring.pos[T % W]) == T and float(ring.k[0, T % W, 0, 0]) == 7.0
