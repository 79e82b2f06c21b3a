"""The block-sparse engine against its reference (a dense masked softmax built from the same table).

The reference, ``efficient_attn.ops.reference.softmax.block_sparse_reference``, materialises
the [T, S] visibility implied by the table and the in-block masks; it is meant for small N.
Both must agree forward (out and lse) and backward (dq, dk, dv, each by name), for odd
lengths, causal, kv_mask, per-head tables, permuted positions, segments, bands, and both
self modes.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from conftest import assert_close, random_arrays, tiered
from efficient_attn.ops.block_sparse import (
    SELF_PENALTY,
    banded_table,
    block_sparse_attention,
    merge_softmax,
    num_blocks,
)
from efficient_attn.ops.reference.softmax import block_sparse_reference


def _data(B, H, T, S, D, E, seed):
    """Head-major q [B, H, T, D], k [B, H, S, D], v [B, H, S, E]."""
    return random_arrays(seed, (B, H, T, D), (B, H, S, D), (B, H, S, E))


def _bsa(q, k, v, table, **kw):
    """The engine as one jitted program (eager op-by-op dispatch is slow on this CPU)."""
    return jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, table, **kw))(q, k, v)


def _random_table(rng, nq, nk, r, heads=None):
    """Rows of distinct key blocks (or -1), optionally one per head."""
    shape = (nq,) if heads is None else (heads, nq)
    out = np.full(shape + (r,), -1, np.int32)
    for idx in np.ndindex(*shape):
        n = rng.integers(0, min(r, nk) + 1)
        out[idx][:n] = rng.choice(nk, size=n, replace=False)
    return out


def _check(q, k, v, table, **kw):
    """Forward and backward agreement with the reference (each side jitted as one program)."""
    w = jax.random.normal(jax.random.key(7), q.shape[:3] + v.shape[3:])

    def run(fn):
        def loss(q, k, v):
            o, l = fn(q, k, v, table, **kw)
            return jnp.sum(o * w) + jnp.sum(jnp.where(jnp.isfinite(l) & (l > -1e4), l, 0.0)), (o, l)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, (out, lse)), g = run(block_sparse_attention)
    (_, (ref, ref_lse)), g_ref = run(block_sparse_reference)
    assert not np.any(np.isnan(np.asarray(out)))
    assert_close("out", out, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse), err_msg="lse: rows that see nothing")
    fin = np.isfinite(ref_lse)
    assert_close("lse", np.asarray(lse)[fin], np.asarray(ref_lse)[fin], atol=2e-4, rtol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv"), g, g_ref):
        assert np.all(np.isfinite(np.asarray(a))), f"{name} is not finite"
        assert_close(name, a, b, atol=5e-5, rtol=5e-4)
    return out, lse


CASES = tiered([  # T, S, block_q, block_k, causal, kv_mask; 2 in CI
    (37, 37, 8, 8, True, True),
    (29, 45, 7, 10, False, True),
    (37, 37, 8, 8, False, False),
    (16, 16, 16, 4, True, False),
    (11, 11, 3, 2, True, True),
], ci=2)


@pytest.mark.parametrize("T,S,bq,bk,causal,use_kv_mask", CASES)
def test_random_tables_match_reference(T, S, bq, bk, causal, use_kv_mask):
    B, H, D, E = 2, 3, 8, 5
    q, k, v = _data(B, H, T, S, D, E, seed=T * S)
    rng = np.random.default_rng(T + S + bq)
    table = _random_table(rng, num_blocks(T, bq), num_blocks(S, bk), r=3)
    kv = jnp.asarray(rng.random((B, S)) < 0.7) if use_kv_mask else None
    _check(q, k, v, table, block_q=bq, block_k=bk, causal=causal, kv_valid=kv)


def test_per_head_table_and_jax_table():
    B, H, T, D = 2, 3, 23, 4
    q, k, v = _data(B, H, T, T, D, D, seed=1)
    rng = np.random.default_rng(3)
    table = _random_table(rng, num_blocks(T, 4), num_blocks(T, 4), r=4, heads=H)
    _check(q, k, v, table, block_q=4, block_k=4, causal=True)
    out_np, _ = _bsa(q, k, v, table, block_q=4, block_k=4)
    out_jx, _ = jax.jit(lambda t: _bsa(q, k, v, t, block_q=4, block_k=4))(jnp.asarray(table))
    np.testing.assert_allclose(out_np, out_jx, atol=1e-6)


@pytest.mark.parametrize("T,b,left,right", tiered([(31, 4, 5, 5), (9, 16, 3, 2), (31, 4, 7, 0), (20, 6, 0, 0)], ci=2))
def test_banded_table_covers_band_exactly(T, b, left, right):
    """banded_table + band equals a dense band mask; every listed block is needed."""
    B, H, D = 1, 2, 4
    q, k, v = _data(B, H, T, T, D, T, seed=T + left)
    nb = num_blocks(T, b)
    table = banded_table(nb, nb, b, b, left, right)
    _check(q, k, v, table, block_q=b, block_k=b, band=(left, right), causal=right == 0)
    # probe: v = identity, q = 0 -> uniform weights over exactly the visible keys
    eye = jnp.broadcast_to(jnp.eye(T), (B, H, T, T))
    out, _ = _bsa(jnp.zeros_like(q), k, eye, table, block_q=b, block_k=b, band=(left, right))
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    want = (j >= i - left) & (j <= i + right)
    np.testing.assert_array_equal(np.asarray(out[0, 0]) > 0, want)
    for I in range(nb):  # no listed block lies wholly outside the band
        for J in table[I][table[I] >= 0]:
            rows, cols = np.arange(I * b, min(T, I * b + b)), np.arange(J * b, min(T, J * b + b))
            assert want[np.ix_(rows, cols)].any()


def test_permuted_positions_segments_and_self_modes():
    """A permuted sequence with original positions: causal and self masks follow the positions."""
    B, H, T, D = 2, 2, 19, 6
    q, k, v = _data(B, H, T, T, D, 3, seed=5)
    rng = np.random.default_rng(11)
    perm = jnp.asarray(np.stack([[rng.permutation(T) for _ in range(H)] for _ in range(B)]))
    seg = jnp.asarray(rng.integers(0, 3, size=(B, H, T)))
    nb = num_blocks(T, 5)
    table = banded_table(nb, nb, 5, 5, 5, 0)
    kv = jnp.asarray(rng.random((B, T)) < 0.8)
    for self_mode in ("exclude", "fallback"):
        _check(q, k, v, table, block_q=5, block_k=5, causal=True, q_pos=perm, k_pos=perm, q_seg=seg,
               k_seg=seg, band=(5, 0), self_mode=self_mode, kv_valid=kv)


def test_fallback_attends_to_self_only_when_alone():
    B, H, T, D = 1, 1, 6, 4
    q, k, _ = _data(B, H, T, T, D, D, seed=2)
    eye = jnp.eye(T)[None, None]
    table = np.zeros((1, 1), np.int32)
    out, lse = _bsa(q, k, eye, table, block_q=T, block_k=T, causal=True, self_mode="fallback")
    w = np.asarray(out[0, 0])
    assert w[0, 0] == pytest.approx(1.0)  # token 0 sees only itself
    np.testing.assert_allclose(np.diag(w)[1:], 0.0, atol=0)  # others never attend to themselves
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert lse[0, 0, 0] < -SELF_PENALTY / 2 and np.all(np.asarray(lse[0, 0, 1:]) > -100)


def test_fully_masked_rows_are_zero_not_nan():
    B, H, T, D = 2, 2, 12, 4
    q, k, v = _data(B, H, T, T, D, D, seed=3)
    kv = jnp.zeros((B, T), bool).at[1, 5:].set(True)  # batch 0: nothing visible; batch 1: keys 5..
    nb = num_blocks(T, 4)
    table = np.tile(np.arange(nb, dtype=np.int32), (nb, 1))
    out, lse = _check(q, k, v, table, block_q=4, block_k=4, causal=True, kv_valid=kv)
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.isneginf(np.asarray(lse[0])))
    assert np.all(np.asarray(out[1, :, :5]) == 0)
    empty_rows = np.full((nb, 2), -1, np.int32)
    out, lse = _bsa(q, k, v, empty_rows, block_q=4, block_k=4)
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_full_table_equals_dense_softmax():
    """Listing every block is plain softmax attention (independent of the reference's table logic)."""
    B, H, T, S, D = 2, 2, 13, 17, 8
    q, k, v = _data(B, H, T, S, D, D, seed=4)
    table = np.tile(np.arange(num_blocks(S, 5), dtype=np.int32), (num_blocks(T, 3), 1))
    out, lse = _bsa(q, k, v, table, block_q=3, block_k=5)
    logits = jnp.einsum("bhtd,bhsd->bhts", q, k) / np.sqrt(D)
    np.testing.assert_allclose(out, jnp.einsum("bhts,bhse->bhte", jax.nn.softmax(logits), v), atol=1e-5)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(logits, -1), atol=1e-5)


def test_merge_softmax_is_softmax_over_union():
    B, H, T, S, D = 1, 2, 7, 12, 4
    q, k, v = _data(B, H, T, S, D, 3, seed=6)
    one = np.zeros((1, 1), np.int32)
    parts = [_bsa(q, k[:, :, a:b], v[:, :, a:b], one, block_q=T, block_k=b - a)
             for a, b in ((0, 5), (5, 12))]
    empty = (jnp.zeros_like(parts[0][0]), jnp.full_like(parts[0][1], -jnp.inf))
    out, lse = merge_softmax(jnp.stack([parts[0][0], empty[0], parts[1][0]]),
                             jnp.stack([parts[0][1], empty[1], parts[1][1]]))
    whole, whole_lse = _bsa(q, k, v, one, block_q=T, block_k=S)
    np.testing.assert_allclose(out, whole, atol=1e-5)
    np.testing.assert_allclose(lse, whole_lse, atol=1e-5)
    z, zl = merge_softmax(jnp.stack([empty[0]] * 2), jnp.stack([empty[1]] * 2))
    assert np.all(np.asarray(z) == 0) and np.all(np.isneginf(np.asarray(zl)))
    g = jax.grad(lambda o: jnp.sum(merge_softmax(jnp.stack([o, empty[0]]), jnp.stack([parts[0][1], empty[1]]))[0]))(parts[0][0])
    assert np.all(np.isfinite(np.asarray(g)))


def test_bad_tables_are_refused():
    q, k, v = _data(1, 1, 8, 8, 4, 4, seed=0)
    with pytest.raises(ValueError, match="query-block rows"):
        _bsa(q, k, v, np.zeros((3, 1), np.int32), block_q=4, block_k=4)
    with pytest.raises(ValueError, match="entries"):
        _bsa(q, k, v, np.full((2, 1), 2, np.int32), block_q=4, block_k=4)


@pytest.mark.parametrize("run_elements", [1, 300, 700], ids=["run_per_block", "last_run_overlaps", "two_runs"])
def test_runs_of_query_blocks_match_reference(monkeypatch, run_elements):
    """Long inputs are processed in runs of query blocks (a loop); same results, forward and
    backward. A query block holds 2 heads x 4 rows x 3 key blocks x 4 keys = 96 logits, so 300
    gives runs of 3 over the 8 query blocks: the forward's start at 0, 3 and 5 (the last run's
    first block, done by the run before it, is written again), the backward's are padded to 9."""
    from efficient_attn.ops import block_sparse

    monkeypatch.setattr(block_sparse, "CHUNK_ELEMENTS", run_elements)
    B, H, T, D = 1, 2, 29, 4
    q, k, v = _data(B, H, T, T, D, 3, seed=8)
    rng = np.random.default_rng(5)
    table = _random_table(rng, num_blocks(T, 4), num_blocks(T, 4), r=3, heads=H)
    kv = jnp.asarray(rng.random((B, T)) < 0.8)
    _check(q, k, v, table, block_q=4, block_k=4, causal=True, kv_valid=kv, band=(9, 0), self_mode="fallback")
