"""The blockwise engine's native grouped-query attention, packed segments, soft cap and sinks.

- GQA, segments, softcap and sinks each equal the dense reference forward and backward
  (dq, dk, dv and the sink gradient by name); the reference reads kv head h // group.
- No per-query-head copy of k: the forward+backward jaxpr holds no [B, S, H, D] array
  when k has Hkv < H heads, and compiled temporary memory at N = 8K with Hkv = H/8 is
  below that with Hkv = H (compile only, memory_analysis).
- Packed sorted segments visit only tiles whose id ranges meet: the count of visited tiles
  (the loop bounds the engine uses) of 8 sequences of 1K is 1/8 of the unpacked count.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from conftest import assert_close, random_arrays, tiered
from efficient_attn.ops.online_softmax import _segment_reach, blockwise_attention
from efficient_attn.ops.reference.softmax import softmax_attention


def _data(T, S, H, Hkv, seed=0):
    return random_arrays(seed, (2, T, H, 8), (2, S, Hkv, 8), (2, S, Hkv, 8), (2, T, H, 8))


def _segments(L, cuts):
    ids = np.zeros((2, L), np.int32)
    for b, row in enumerate(cuts):
        for c in row:
            ids[b, c:] += 1
    return jnp.asarray(ids)


def _check(ours, ref, args, names, rtol=1e-4, atol=1e-5):
    # jitted: eager dispatch of the engine's loops costs several times one compile here
    assert_close("out", jax.jit(ours)(*args[:-1]), jax.jit(ref)(*args[:-1]), rtol=rtol, atol=atol)
    w = args[-1]
    argnums = tuple(range(len(names)))
    g_ours = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums))(*args[:-1])
    g_ref = jax.jit(jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums))(*args[:-1])
    for name, a, b in zip(names, g_ours, g_ref):
        assert_close(name, a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("T,S,Hkv,causal,kv", tiered([(37, 37, 1, True, True), (37, 53, 2, False, True),
                                                      (40, 40, 2, True, False)], ci=1))
def test_gqa_matches_reference(T, S, Hkv, causal, kv):
    q, k, v, w = _data(T, S, 4, Hkv)
    m = None
    if kv:
        m = jnp.asarray(np.random.default_rng(0).random((2, S)) > 0.3).at[:, 0].set(True)
    mask = ea.Mask(causal=causal, kv_mask=m)
    ours = lambda q, k, v: blockwise_attention(q, k, v, causal=causal, kv_mask=m, block_size=16,  # noqa: E731
                                               backward_query_block=8)
    ref = lambda q, k, v: softmax_attention(q, k, v, mask)  # noqa: E731
    _check(ours, ref, (q, k, v, w), ("dq", "dk", "dv"))


@pytest.mark.parametrize("causal", [False, True])
def test_segments_match_reference(causal):
    T = 48
    q, k, v, w = _data(T, T, 2, 1, seed=1)
    seg = _segments(T, [(5, 20, 21, 40), (30,)])
    mask = ea.Mask(causal=causal, q_segment_ids=seg, kv_segment_ids=seg)
    ours = lambda q, k, v: blockwise_attention(q, k, v, causal=causal, q_segment_ids=seg,  # noqa: E731
                                               kv_segment_ids=seg, block_size=16, backward_query_block=8)
    ref = lambda q, k, v: softmax_attention(q, k, v, mask)  # noqa: E731
    _check(ours, ref, (q, k, v, w), ("dq", "dk", "dv"))


def test_unsorted_segments_still_exact():
    """Ids out of order (not what packing writes) cost more tiles but stay exact."""
    T = 32
    q, k, v, w = _data(T, T, 2, 2, seed=2)
    seg = jnp.asarray(np.random.default_rng(2).integers(0, 3, (2, T)), jnp.int32)
    mask = ea.Mask(q_segment_ids=seg, kv_segment_ids=seg)
    ours = lambda q, k, v: blockwise_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,  # noqa: E731
                                               block_size=8, backward_query_block=8)
    _check(ours, lambda q, k, v: softmax_attention(q, k, v, mask), (q, k, v, w), ("dq", "dk", "dv"))


@pytest.mark.parametrize("causal,softcap,use_sinks", [(True, 2.0, True), (False, None, True), (False, 1.5, False)])
def test_softcap_and_sinks_match_reference(causal, softcap, use_sinks):
    T = 40
    q, k, v, w = _data(T, T, 4, 2, seed=3)
    q, k = 3.0 * q, 3.0 * k  # logits well past the cap
    m = jnp.asarray(np.random.default_rng(3).random((2, T)) > 0.3).at[1].set(False)  # batch 1 sees nothing
    sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0])
    mask = ea.Mask(causal=causal, kv_mask=m)

    def ours(q, k, v, s):
        return blockwise_attention(q, k, v, causal=causal, kv_mask=m, softcap=softcap,
                                   sinks=s if use_sinks else None, block_size=16, backward_query_block=8)

    def ref(q, k, v, s):
        return softmax_attention(q, k, v, mask, softcap=softcap, sinks=s if use_sinks else None)

    names = ("dq", "dk", "dv", "d_sinks")
    _check(ours, ref, (q, k, v, sinks, w), names if use_sinks else names[:3] + ("d_sinks_unused",))
    assert float(jnp.max(jnp.abs(ours(q, k, v, sinks)[1]))) == 0.0  # fully masked rows are zeros


def test_bad_softcap_refused():
    q, k, v, _ = _data(8, 8, 2, 2)
    for c in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            blockwise_attention(q, k, v, softcap=c)


def test_packed_tiles_visited():
    """8 sorted sequences of 1K with 1K blocks: each query block meets one key block (8 tiles,
    not 64); with segment starts off the block grid, at most three (the block before and after)."""
    L, nb = 8192, 8
    aligned = jnp.asarray(np.repeat(np.arange(8), 1024)[None], jnp.int32)
    lo, hi = _segment_reach(aligned, aligned, 1024, 1024, nb, nb)
    assert int(jnp.sum(hi - lo)) == 8
    shifted = jnp.asarray(np.repeat(np.arange(9), [512] + [1024] * 7 + [512])[None], jnp.int32)
    lo, hi = _segment_reach(shifted, shifted, 1024, 1024, nb, nb)
    assert int(jnp.sum(hi - lo)) == 3 * nb - 2  # blocks 0 and 7 have no neighbour on one side
    assert L == nb * 1024


def _fwd_bwd(H, Hkv, N, D=64):
    q = jax.ShapeDtypeStruct((1, N, H, D), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, N, Hkv, D), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(blockwise_attention(q, k, v, causal=True))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, kv, kv)


def test_gqa_temporary_memory_below_mha_at_8k():
    H, N = 8, 8192
    temps = {}
    for Hkv in (H // 8, H):
        fn, args = _fwd_bwd(H, Hkv, N)
        temps[Hkv] = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temps[H // 8] < temps[H], temps


def _shapes(jaxpr):
    """Every array shape produced in ``jaxpr``, sub-jaxprs (loops, custom_vjp) included."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _shapes(getattr(inner, "jaxpr", inner))


def test_no_per_query_head_copy_of_k_in_jaxpr():
    """Cross attention (T != S), so no q-shaped array can be mistaken for a repeated k."""
    B, H, Hkv, T, S, D = 1, 8, 1, 96, 256, 16
    q, k, v = random_arrays(0, (B, T, H, D), (B, S, Hkv, D), (B, S, Hkv, D))
    m = jnp.ones((B, S), bool)
    fn = jax.grad(lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, kv_mask=m, block_size=64)), argnums=(0, 1, 2))
    shapes = set(_shapes(jax.make_jaxpr(fn)(q, k, v).jaxpr))
    forbidden = {(B, S, H, D), (B, H, S, D), (B * H, S, D)}
    assert not shapes & forbidden, sorted(shapes & forbidden)
    assert (B * Hkv, S, D) in shapes  # the walk does see the kv-head-major k
