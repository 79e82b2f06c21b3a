"""Every engine against its readable reference in ``efficient_attn/ops/reference/``, forward AND
backward, each quantity checked by name (out, lse, dq, dk, dv, dphi_q, ..., and every parameter).

    online_softmax.blockwise_attention      reference.softmax.softmax_attention
    block_sparse.block_sparse_attention     reference.softmax.block_sparse_reference
    linear_attention.linear_attention       reference.linear: quadratic and recurrent forms
    reformer (its LSH engine)               reference.lsh.lsh_attention_reference
    sinkhorn (its block attention)          reference.sinkhorn.sinkhorn_attention_reference

The first section checks the references against each other where two of them must agree
(so a reference cannot drift along with the engine it checks). Gradients are of
sum(out * w) for a fixed random w (plus sum(lse) where an engine returns lse).

Tolerances, float32 throughout: forward rtol = atol = 1e-5; gradients rtol = 1e-4,
atol = 2e-5 (a reassociated sum of T terms of size ~1 loses a few ulps per term; the
backward passes recompute and reassociate more). Small shapes (B = 2, H = 2, T <= 64,
D = 8), odd lengths, causal and not, kv_mask with fully masked rows. Each side is one
jitted program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from conftest import assert_all_close, assert_close, build, jit_module, make_qkv, named_grads, random_arrays
from efficient_attn.ops.block_sparse import block_sparse_attention, num_blocks
from efficient_attn.ops.linear_attention import linear_attention
from efficient_attn.ops.online_softmax import blockwise_attention
from efficient_attn.ops.reference.linear import (
    linear_attention_log_features,
    linear_attention_quadratic,
    linear_attention_recurrent,
)
from efficient_attn.ops.reference.lsh import lsh_attention_reference, shared_qk_attention
from efficient_attn.ops.reference.sinkhorn import key_blocks, sinkhorn_attention_reference
from efficient_attn.ops.reference.softmax import block_sparse_reference, softmax_attention
from efficient_attn.variants.full import full_attention

FWD = dict(rtol=1e-5, atol=1e-5)
BWD = dict(rtol=1e-4, atol=2e-5)
B, H, D = 2, 2, 8


def _kv_mask(S: int, seed: int = 0) -> jax.Array:
    """Random real keys; batch 1 has its first S // 2 keys masked (early causal rows see nothing)."""
    m = np.random.default_rng(seed).random((B, S)) > 0.3
    m[1, : S // 2] = False
    return jnp.asarray(m)


def _out_and_grads(fn, names, args, w):
    """fn(*args) and {name: d sum(fn(*args) * w) / d arg}, as one jitted program."""

    def loss(*a):
        out = fn(*a)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return out, dict(zip(names, grads))


def _check(engine, reference, names, args, w, fwd=FWD, bwd=BWD):
    """Engine and reference agree on the output and on every named gradient; nothing is NaN."""
    out, grads = _out_and_grads(engine, names, args, w)
    ref, ref_grads = _out_and_grads(reference, names, args, w)
    assert_close("out", out, ref, **fwd)
    for name, g in grads.items():
        assert np.all(np.isfinite(np.asarray(g))), f"{name} is not finite"
    assert_all_close(grads, ref_grads, **bwd)
    return out, grads


# ------------------------------------------------------------------ the references agree


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_reference_is_full_attention(causal):
    """reference.softmax == variants/full.py (kv_mask with empty rows, a dense mask, cross lengths)."""
    T, S = (29, 29) if causal else (19, 33)
    q, k, v = make_qkv(T, S, seed=1)
    dense = jnp.asarray(np.random.default_rng(1).random((1, H, T, S)) > 0.2)
    mask = ea.Mask(causal=causal, kv_mask=_kv_mask(S), dense=dense)
    (w,) = random_arrays(2, (B, T, H, D))
    _check(lambda q, k, v: softmax_attention(q, k, v, mask), lambda q, k, v: full_attention(q, k, v, mask),
           ("dq", "dk", "dv"), (q, k, v), w)


def test_softmax_reference_zeroes_masked_queries_and_empty_rows():
    q, k, v = make_qkv(12, seed=3)
    q_mask = jnp.arange(12)[None, :] < jnp.array([[12], [5]])
    kv = jnp.zeros((B, 12), bool).at[0].set(True)
    out = softmax_attention(q, k, v, ea.Mask(kv_mask=kv, q_mask=q_mask))
    assert np.all(np.asarray(out[1]) == 0)  # batch 1: no real key
    np.testing.assert_allclose(out[0], full_attention(q, k, v)[0], rtol=1e-6, atol=1e-6)
    out = softmax_attention(q, k, v, ea.Mask(q_mask=q_mask))
    assert np.all(np.asarray(out[1, 5:]) == 0) and np.all(np.asarray(out[1, :5]) != 0)


def test_block_table_reference_with_every_block_listed_is_softmax():
    """Independent of the table logic: listing every key block is plain (masked) softmax attention."""
    T, S = 13, 17
    q, k, v = make_qkv(T, S, seed=4)
    kv = _kv_mask(S, seed=4)
    table = np.tile(np.arange(num_blocks(S, 5), dtype=np.int32), (num_blocks(T, 3), 1))
    head_major = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    out, lse = block_sparse_reference(*map(head_major, (q, k, v)), table, block_q=3, block_k=5, kv_valid=kv)
    assert_close("out", head_major(out), softmax_attention(q, k, v, ea.Mask(kv_mask=kv)), **FWD)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
    want = jax.nn.logsumexp(jnp.where(kv[:, None, None, :], logits, -jnp.inf), axis=-1)
    assert_close("lse", lse, want, **FWD)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "log_scale"])
def test_linear_quadratic_and_recurrent_references_agree(scaled):
    """The two forms of causal linear attention: an explicit [T, T] matrix, and running sums."""
    T, F = 23, 6
    phi_q, phi_k, v, ls = random_arrays(5, (B, T, H, F), (B, T, H, F), (B, T, H, D), (B, T, H))
    phi_q, phi_k = jnp.exp(0.5 * phi_q), jnp.exp(0.5 * phi_k)
    kv = _kv_mask(T, seed=5)
    ls = 3.0 * ls if scaled else None
    eps = 0.0 if scaled else 1e-3
    (w,) = random_arrays(6, (B, T, H, D))
    names, args = ("dphi_q", "dphi_k", "dv"), (phi_q, phi_k, v)
    if scaled:
        names, args = names + ("dlog_scale",), args + (ls,)

    def quad(a, b, c, l=None):
        return linear_attention_quadratic(a, b, c, causal=True, kv_mask=kv, k_log_scale=l, eps=eps)

    def rec(a, b, c, l=None):
        return linear_attention_recurrent(a, b, c, kv_mask=kv, k_log_scale=l, eps=eps)

    _check(rec, quad, names, args, w)


def test_linear_log_feature_reference_is_the_quadratic_form():
    """Positive features given by their logs == the same features exponentiated (moderate sizes)."""
    T, S, F = 17, 21, 6
    lq, lk, v = random_arrays(7, (B, T, H, F), (B, S, H, F), (B, S, H, D))
    kv = _kv_mask(S, seed=7)
    (w,) = random_arrays(8, (B, T, H, D))
    _check(lambda a, b, c: linear_attention_log_features(a, b, c, kv_mask=kv),
           lambda a, b, c: linear_attention_quadratic(jnp.exp(a), jnp.exp(b), c, kv_mask=kv),
           ("dlog_phi_q", "dlog_phi_k", "dv"), (lq, lk, v), w)


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_reference_with_one_chunk_is_shared_qk_attention(causal):
    """bucket_size >= T: one bucket, one chunk, so every round sees everything (self only when alone)."""
    T = 21
    q, _, v = make_qkv(T, seed=9)
    rotations = random_arrays(10, (2, H, D, 1))[0]
    kv = _kv_mask(T, seed=9)
    (w,) = random_arrays(11, (B, T, H, D))
    _check(lambda q, v: lsh_attention_reference(q, v, rotations, 32, causal=causal, kv_mask=kv),
           lambda q, v: shared_qk_attention(q, v, ea.Mask(causal=causal, kv_mask=kv)), ("dq", "dv"), (q, v), w)


@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_reference_with_one_block_is_softmax(causal):
    """One block (N <= b): the sorted slot is the block itself (P = [[1]]; causal: no earlier block)."""
    T = 11
    q, k, v = make_qkv(T, seed=12)
    kv = _kv_mask(T, seed=12)
    p = jnp.full((B, H, 1, 1), 0.0 if causal else 1.0)
    (w,) = random_arrays(13, (B, T, H, D))
    _check(lambda q, k, v: sinkhorn_attention_reference(q, k, v, p, block_size=16, kv_mask=kv, causal=causal),
           lambda q, k, v: softmax_attention(q, k, v, ea.Mask(causal=causal, kv_mask=kv)), ("dq", "dk", "dv"),
           (q, k, v), w)


def test_engines_and_references_agree_on_non_finite_inputs():
    """The rules of ops.masks, for engine and reference alike: a masked key's NaN / Inf never
    matters, and a NaN value poisons exactly the rows that see it (causal: from its position on,
    in its head), never turning into a plausible number and never reaching the other rows."""
    T, bad = 16, 9
    q, k, v = make_qkv(T, seed=60)
    kv = jnp.ones((B, T), bool).at[:, 3].set(False)
    k, v = k.at[:, 3].set(jnp.nan), v.at[:, 3].set(jnp.inf)  # a masked key holding garbage
    v = v.at[:, bad, 0, 2].set(jnp.nan)  # one entry of a real key's value, head 0
    causal = ea.Mask(causal=True, kv_mask=kv)
    head_major = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    table = np.tile(np.arange(4, dtype=np.int32), (4, 1))  # every key block: plain causal attention
    phi_q, phi_k = jnp.exp(0.5 * q), jnp.exp(0.5 * k)
    pairs = {
        "blockwise": (blockwise_attention(q, k, v, causal=True, kv_mask=kv, block_size=4),
                      softmax_attention(q, k, v, causal)),
        "block_sparse": (block_sparse_attention(*map(head_major, (q, k, v)), table, block_q=4, block_k=4, causal=True,
                                                kv_valid=kv)[0].transpose(0, 2, 1, 3),
                         block_sparse_reference(*map(head_major, (q, k, v)), table, block_q=4, block_k=4, causal=True,
                                                kv_valid=kv)[0].transpose(0, 2, 1, 3)),
        "linear (quadratic)": (linear_attention(phi_q, phi_k, v, causal=True, kv_mask=kv, chunk_size=4),
                               linear_attention_quadratic(phi_q, phi_k, v, causal=True, kv_mask=kv)),
        "linear (recurrent)": (linear_attention(phi_q, phi_k, v, causal=True, kv_mask=kv, chunk_size=4),
                               linear_attention_recurrent(phi_q, phi_k, v, kv_mask=kv)),
    }
    want_nan = np.zeros((B, T, H, D), bool)
    want_nan[:, bad:, 0] = True
    for name, (got, ref) in pairs.items():
        for side, x in (("engine", got), ("reference", ref)):
            np.testing.assert_array_equal(np.isnan(np.asarray(x)), want_nan, err_msg=f"{name} {side}: NaN rows")
        assert_close(f"{name}: finite rows", np.where(want_nan, 0.0, got), np.where(want_nan, 0.0, ref), **FWD)


# ------------------------------------------------------------------ online softmax (blockwise)

BLOCKWISE_CASES = [
    # T, S, causal, kv_mask, block_size, backward_query_block
    (37, 37, True, True, 8, 16),  # 5 blocks of 8, the last one ragged (5 rows)  # causal tiles straddle the diagonal; fully masked rows in batch 1
    (37, 37, True, False, 16, 8),  # square causal blocks (the split diagonal tile), ragged
    (23, 41, False, True, 8, 8),  # cross attention, both lengths ragged
    (64, 64, True, True, 16, 24),  # blocks dividing T forward, not backward
]


@pytest.mark.parametrize("T,S,causal,use_kv,block,bwd_block", BLOCKWISE_CASES)
def test_blockwise_matches_dense_softmax(T, S, causal, use_kv, block, bwd_block):
    q, k, v = make_qkv(T, S, seed=T + S)
    kv = _kv_mask(S) if use_kv else None
    (w,) = random_arrays(14, (B, T, H, D))
    out, _ = _check(
        lambda q, k, v: blockwise_attention(q, k, v, causal=causal, kv_mask=kv, block_size=block,
                                            backward_query_block=bwd_block),
        lambda q, k, v: softmax_attention(q, k, v, ea.Mask(causal=causal, kv_mask=kv)),
        ("dq", "dk", "dv"), (q, k, v), w)
    if causal and use_kv:  # batch 1, queries before its first real key: zeros, not NaN
        assert np.all(np.asarray(out[1, : S // 2]) == 0)


# ------------------------------------------------------------------ block-sparse


def _random_table(rng, nq, nk, r, heads=None):
    shape = (nq,) if heads is None else (heads, nq)
    out = np.full(shape + (r,), -1, np.int32)
    for idx in np.ndindex(*shape):
        n = rng.integers(0, min(r, nk) + 1)
        out[idx][:n] = rng.choice(nk, size=n, replace=False)
    return out


def _check_block_sparse(T, S, table, seed, **kw):
    q, k, v = (x.transpose(0, 2, 1, 3) for x in make_qkv(T, S, seed=seed))  # head-major
    (w,) = random_arrays(seed + 1, (B, H, T, D))

    def run(fn):
        def loss(q, k, v):
            out, lse = fn(q, k, v, table, **kw)
            seen = jnp.isfinite(lse) & (lse > -1e4)  # rows that saw a key other than a penalised self
            return jnp.sum(out * w) + jnp.sum(jnp.where(seen, lse, 0.0)), (out, lse)

        (_, (out, lse)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return {"out": out, "lse": jnp.where(jnp.isfinite(lse), lse, 0.0)}, dict(zip(("dq", "dk", "dv"), g))

    got, grads = run(block_sparse_attention)
    want, ref_grads = run(block_sparse_reference)
    assert_close("out", got["out"], want["out"], **FWD)
    assert_close("lse", got["lse"], want["lse"], rtol=1e-5, atol=1e-4)  # lse ~ 1e5 where self is penalised
    assert_all_close(grads, ref_grads, **BWD)


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_matches_dense_over_its_table(causal):
    T, S = (37, 37) if causal else (29, 45)
    bq, bk = (8, 8) if causal else (7, 10)
    rng = np.random.default_rng(T)
    table = _random_table(rng, num_blocks(T, bq), num_blocks(S, bk), r=3, heads=H if causal else None)
    _check_block_sparse(T, S, table, seed=20, block_q=bq, block_k=bk, causal=causal, kv_valid=_kv_mask(S))


def test_block_sparse_matches_dense_with_positions_segments_band_and_self_fallback():
    T = 19
    rng = np.random.default_rng(21)
    perm = jnp.asarray(np.stack([[rng.permutation(T) for _ in range(H)] for _ in range(B)]))
    seg = jnp.asarray(rng.integers(0, 3, size=(B, H, T)))
    nb = num_blocks(T, 5)
    table = np.stack([np.arange(nb) - 1, np.arange(nb)], -1).astype(np.int32)  # block c sees c-1, c
    _check_block_sparse(T, T, table, seed=22, block_q=5, block_k=5, causal=True, kv_valid=_kv_mask(T, 22),
                        q_pos=perm, k_pos=perm, q_seg=seg, k_seg=seg, band=(5, 0), self_mode="fallback")


# ------------------------------------------------------------------ linear attention

LINEAR_CASES = [
    # T, S, causal, kv_mask, chunk, log_scale
    (37, 37, False, True, 8, True),
    (23, 41, False, True, 8, False),  # cross attention
    (37, 37, True, True, 8, True),  # 4 chunks of 8 + 5
    (9, 9, True, True, 4, True),
]


def _linear_inputs(T, S, seed, F=6):
    phi_q, phi_k, v, ls = random_arrays(seed, (B, T, H, F), (B, S, H, F), (B, S, H, D), (B, S, H))
    return jnp.exp(0.5 * phi_q), jnp.exp(0.5 * phi_k), v, 3.0 * ls  # positive features: den > 0


@pytest.mark.parametrize("T,S,causal,use_kv,chunk,scaled", LINEAR_CASES)
def test_linear_attention_matches_quadratic_form(T, S, causal, use_kv, chunk, scaled):
    phi_q, phi_k, v, ls = _linear_inputs(T, S, seed=30 + T)
    kv = _kv_mask(S) if use_kv else None
    eps = 0.0 if scaled else 1e-3
    (w,) = random_arrays(31, (B, T, H, D))
    names, args = ("dphi_q", "dphi_k", "dv"), (phi_q, phi_k, v)
    if scaled:
        names, args = names + ("dlog_scale",), args + (ls,)
    _check(lambda a, b, c, l=None: linear_attention(a, b, c, causal=causal, kv_mask=kv, k_log_scale=l, eps=eps,
                                                    chunk_size=chunk),
           lambda a, b, c, l=None: linear_attention_quadratic(a, b, c, causal=causal, kv_mask=kv, k_log_scale=l,
                                                              eps=eps),
           names, args, w)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "log_scale"])
def test_causal_linear_attention_matches_recurrent_form(scaled):
    T = 29
    phi_q, phi_k, v, ls = _linear_inputs(T, T, seed=32)
    kv = _kv_mask(T, seed=32)
    eps = 0.0 if scaled else 1e-6
    (w,) = random_arrays(33, (B, T, H, D))
    names, args = ("dphi_q", "dphi_k", "dv"), (phi_q, phi_k, v)
    if scaled:
        names, args = names + ("dlog_scale",), args + ((ls + 200.0),)  # exp(l) alone would overflow float32
    out, _ = _check(
        lambda a, b, c, l=None: linear_attention(a, b, c, causal=True, kv_mask=kv, k_log_scale=l, eps=eps,
                                                 chunk_size=8),
        lambda a, b, c, l=None: linear_attention_recurrent(a, b, c, kv_mask=kv, k_log_scale=l, eps=eps),
        names, args, w)
    assert np.all(np.asarray(out[1, : T // 2]) == 0)  # batch 1: no real key yet


# ------------------------------------------------------------------ reformer (LSH)


@pytest.mark.parametrize("T,m,hashes,causal", [(53, 8, 3, False), (53, 8, 3, True), (40, 5, 1, True),
                                               (30, 64, 2, False)])
def test_reformer_matches_dense_lsh(T, m, hashes, causal):
    attn = build("reformer", H, D, num_hashes=hashes, bucket_size=m)
    f = jit_module(attn)
    rotations = attn.rotations[...]
    q, k, v = make_qkv(T, seed=40 + T)
    kv = _kv_mask(T, seed=T)
    mask = ea.Mask(causal=causal, kv_mask=kv)
    (w,) = random_arrays(41, (B, T, H, D))
    # shared QK: k is not an input of either side (the module ignores it), so there is no dk
    _check(lambda q, v: f(q, k, v, mask),
           lambda q, v: lsh_attention_reference(q, v, rotations, m, causal=causal, kv_mask=kv),
           ("dq", "dv"), (q, v), w)


# ------------------------------------------------------------------ sinkhorn


@pytest.mark.parametrize("T,b,hidden,causal", [(18, 4, 6, True), (21, 8, 0, False)])
def test_sinkhorn_matches_dense_sinkhorn_with_parameter_gradients(T, b, hidden, causal):
    """Module and reference share the module's sort network; every gradient is compared by name,
    q, k, v and each parameter of the sorting network (P depends on k and on them)."""
    attn = build("sinkhorn", H, D, max_len=32, block_size=b, sort_hidden=hidden, temperature=0.5)
    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)
    q, k, v = make_qkv(T, seed=50 + T, Dv=5)
    kv = _kv_mask(T, seed=50)
    mask = ea.Mask(causal=causal, kv_mask=kv)
    (w,) = random_arrays(51, (B, T, H, 5))

    def engine(p, q, k, v):
        return nnx.merge(graphdef, p, rest)(q, k, v, mask=mask)

    def reference(p, q, k, v):
        kb, valid = key_blocks(k, kv, b)
        sort = nnx.merge(graphdef, p, rest).sort_matrix(kb, valid, causal)
        return sinkhorn_attention_reference(q, k, v, sort, block_size=b, kv_mask=kv, causal=causal)

    def run(fn):
        out, g = _out_and_grads(fn, ("dparams", "dq", "dk", "dv"), (params, q, k, v), w)
        return out, {**named_grads(g.pop("dparams")), **g}

    out, grads = run(engine)
    ref, ref_grads = run(reference)
    assert_close("out", out, ref, **FWD)
    assert {"dw_sort", "db_sort"} <= set(grads) and (not hidden or "dw_hidden" in grads), sorted(grads)
    assert float(jnp.abs(grads["dw_sort"]).sum()) > 0  # the sorting network is reached
    assert_all_close(grads, ref_grads, **BWD)
