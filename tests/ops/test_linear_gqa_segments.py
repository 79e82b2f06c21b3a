"""The linear-attention engine's grouped-query heads and packed segments, and the kernel variants on them.

- GQA: the engine on phi(K), V of Hkv < H heads equals the engine on them repeated per query
  head, forward and backward (the gradient of a shared kv head is the sum over its group).
- Segments: the engine equals the quadratic reference (pairs of one segment only) forward and
  backward, gradients by name, for each layout the engine handles differently: sorted ids
  (runs), unsorted ids (sorted into runs), different query and key ids and cross attention
  (one merged sequence); causal and bidirectional, with kv_mask and FAVOR+ log scales, all
  with GQA (the reference reads kv head h // G by index). Another sequence's NaN never
  reaches a segment.
- linear, performer and cosformer: a packed row equals its sequences run alone, forward and
  backward (cosformer's positions restart per segment; causal and bidirectional).
- Decoding with GQA (state of Hkv heads): prefill + steps == the causal forward (performer:
  the grouped read with log scales that linear and cosformer share without them).
Shapes are small (T <= 32, H = 4, F <= 8) and each function is jitted once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from conftest import assert_close, random_arrays
from efficient_attn.ops.linear_attention import linear_attention
from efficient_attn.ops.reference.linear import linear_attention_quadratic

B, T, H, HKV, F, DV = 2, 29, 4, 2, 5, 3
G = H // HKV
CHUNK = 4  # T = 29: 7 chunks of 4 + 1, so runs cross chunk boundaries and padding is exercised


def _inputs(T=T, S=T, seed=0):
    q, k, v, l = random_arrays(seed, (B, T, H, F), (B, S, HKV, F), (B, S, HKV, DV), (B, S, HKV))
    return jnp.exp(0.5 * q), jnp.exp(0.5 * k), v, jnp.round(64.0 * l) / 16.0  # positive features, big scales


def _ids(L, cuts):
    ids = np.zeros((B, L), np.int32)
    for b, row in enumerate(cuts):
        for c in row:
            ids[b, c:] += 1
    return jnp.asarray(ids)


SORTED = _ids(T, [(1, 7, 8, 20), (15,)])  # a run of one token, runs across chunk boundaries
UNSORTED = jnp.asarray(np.random.default_rng(0).integers(0, 3, (B, T)), jnp.int32)
KV_MASK = jnp.asarray(np.random.default_rng(1).random((B, T)) > 0.25)


def _repeat(x):
    return jnp.repeat(x, G, axis=2)


def _group_sum(g):
    return g.reshape(g.shape[:2] + (HKV, G) + g.shape[3:]).sum(3)


def _fwd_bwd(fn, args, w):
    """(fn(*args), d/d args of sum(fn * w)) in one jitted program."""
    def run(*a):
        out, pull = jax.vjp(fn, *a)
        return out, pull(w)

    return jax.jit(run)(*args)


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_repeated_kv(causal):
    """(The engine on repeated k/v is the MHA path that tests/ops/test_linear_attention.py checks
    against the references; GQA against the reference itself is in the segment tests below.)"""
    q, k, v, l = _inputs()
    w = random_arrays(9, (B, T, H, DV))[0]
    kw = dict(causal=causal, kv_mask=KV_MASK, eps=0.0)
    ours = lambda q, k, v, l: linear_attention(q, k, v, k_log_scale=l, chunk_size=CHUNK, **kw)  # noqa: E731
    gqa, g_gqa = _fwd_bwd(ours, (q, k, v, l), w)
    rep, g_rep = _fwd_bwd(ours, (q, _repeat(k), _repeat(v), _repeat(l)), w)
    assert_close("out vs repeated", gqa, rep, rtol=1e-5, atol=1e-6)
    for i, name in enumerate(("dphi_q", "dphi_k", "dv", "dlog_scale")):
        rep_i = g_rep[i] if i == 0 else _group_sum(g_rep[i])  # a shared kv head: the sum over its group
        assert_close(f"{name} vs repeated", g_gqa[i], rep_i, rtol=1e-4, atol=1e-5)


LAYOUTS = {  # name: (T, S, q ids, kv ids)
    "sorted": (T, T, SORTED, SORTED),
    "unsorted": (T, T, UNSORTED, UNSORTED),
    "different_ids": (T, T, SORTED, UNSORTED),
    "cross": (T, 17, UNSORTED, UNSORTED[:, ::-1][:, :17]),
}


@pytest.mark.parametrize("layout,causal,scaled", [  # each layout path once: sorted into runs / cond -> merged / merged
    ("unsorted", True, True), ("different_ids", True, False), ("cross", False, True),
])
def test_segments_match_reference_forward_and_backward(layout, causal, scaled):
    T_, S_, qs, ks = LAYOUTS[layout]
    q, k, v, l = _inputs(T_, S_, seed=2)
    w = random_arrays(8, (B, T_, H, DV))[0]
    kw = dict(causal=causal, kv_mask=KV_MASK[:, :S_], q_segment_ids=qs, kv_segment_ids=ks, eps=0.0 if scaled else 1e-3)

    def ours(q, k, v, l):
        return linear_attention(q, k, v, k_log_scale=l if scaled else None, chunk_size=CHUNK, **kw)

    def ref(q, k, v, l):
        return linear_attention_quadratic(q, k, v, k_log_scale=l if scaled else None, **kw)

    got, g_ours = _fwd_bwd(ours, (q, k, v, l), w)
    want, g_ref = _fwd_bwd(ref, (q, k, v, l), w)
    assert_close("out", got, want, rtol=1e-5, atol=1e-6)
    names = ("dphi_q", "dphi_k", "dv", "dlog_scale" if scaled else "dlog_scale_unused")
    for name, a, b in zip(names, g_ours, g_ref):
        assert_close(name, a, b, rtol=1e-4, atol=1e-5)


def test_segment_outputs_ignore_other_segments_bit_for_bit():
    """A NaN anywhere in another sequence of the row never reaches a segment (forward)."""
    q, k, v, l = _inputs(seed=3)
    kw = dict(q_segment_ids=SORTED, kv_segment_ids=SORTED, chunk_size=CHUNK)
    other = (SORTED == 0)[:, :, None, None]  # batch 0: segment 0 is token 0; batch 1: tokens 0..14
    for causal in (False, True):
        f = jax.jit(lambda q, k, v, l: linear_attention(q, k, v, causal=causal, k_log_scale=l, **kw))  # noqa: B023
        clean = f(q, k, v, l)
        dirty = f(q, jnp.where(other, jnp.nan, k), jnp.where(other, jnp.inf, v), jnp.where(other[..., 0], 1e4, l))
        seen = np.asarray(other[..., 0, 0])  # [B, T]: the tokens of the poisoned sequence
        assert np.isnan(np.asarray(dirty)[seen]).all()  # they see the NaN keys
        np.testing.assert_array_equal(np.asarray(dirty)[~seen], np.asarray(clean)[~seen])


# ------------------------------------------------------------------- the kernel variants

KERNELS = {"linear": {}, "performer": {"num_features": 8, "redraw": False}, "cosformer": {}}
D = 8


def _variant(name, num_kv_heads=H, chunk_size=CHUNK):
    return ea.build(name, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(0), num_kv_heads=num_kv_heads,
                    chunk_size=chunk_size, **KERNELS[name])


def test_kernel_variants_claim_gqa_and_segments():
    for name in KERNELS:
        c = ea.get_spec(name).capabilities
        assert c.gqa and c.segments, name


@pytest.mark.parametrize("name,causal", [  # the engine's segments are checked above (performer's log scales
    ("linear", False), ("cosformer", True),  # too); cosformer's positions are its own
])
def test_packed_equals_each_sequence_alone_forward_and_backward(name, causal):
    """One row packs 3 sequences of 8 tokens (GQA, chunks of 3: segments start mid-chunk); the
    same sequences run alone are a batch of 3 rows of 8."""
    n, L = 3, 8
    q, k, v, w = random_arrays(4, (1, n * L, H, D), (1, n * L, HKV, D), (1, n * L, HKV, D), (1, n * L, H, D))
    ids = jnp.asarray(np.repeat(np.arange(n), L)[None], jnp.int32)
    alone = lambda x: x.reshape((n, L) + x.shape[2:])  # noqa: E731
    graphdef, state = nnx.split(_variant(name, HKV, chunk_size=3))

    def run(q, k, v, ids=None):
        mask = ea.Mask(causal=causal, q_segment_ids=ids, kv_segment_ids=ids)
        return nnx.merge(graphdef, state, copy=True)(q, k, v, mask=mask)

    out, grads = _fwd_bwd(lambda q, k, v: run(q, k, v, ids), (q, k, v), w)
    want, want_grads = _fwd_bwd(run, (alone(q), alone(k), alone(v)), alone(w))
    assert_close(f"{name} out", alone(out), want, rtol=1e-5, atol=1e-6)
    for g_name, got_g, want_g in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(f"{name} {g_name}", alone(got_g), want_g, rtol=1e-4, atol=1e-5)


def test_gqa_decoding_equals_causal_forward():
    """init_state holds Hkv heads; prefill of 7 tokens + 3 steps == the causal forward."""
    N, P = 10, 7
    q, k, v = random_arrays(5, (B, N, H, D), (B, N, HKV, D), (B, N, HKV, D))
    for name in ("performer",):  # linear's and cosformer's steps are the same grouped read without log scales
        module = _variant(name, HKV)
        graphdef, state = nnx.split(module)

        def decode(q, k, v):
            m = nnx.merge(graphdef, state, copy=True)
            s = m.init_state(B, max_len=N)
            head, s = m.prefill(q[:, :P], k[:, :P], v[:, :P], s)
            outs = [head]
            for t in range(P, N):
                o, s = m.step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], s)
                outs.append(o)
            return jnp.concatenate(outs, axis=1), s

        def forward(q, k, v):
            return nnx.merge(graphdef, state, copy=True)(q, k, v, mask=ea.Mask(causal=True))

        got, s = jax.jit(decode)(q, k, v)
        sums = s.data["sums"] if name == "performer" else s.data
        assert sums.kv.shape[1] == HKV, (name, sums.kv.shape)
        assert_close(f"{name} decoded", got, jax.jit(forward)(q, k, v), rtol=1e-4, atol=1e-5)


def test_bad_heads_and_segment_ids_refused():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="kv head count"):
        linear_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))  # 3 does not divide 4
    with pytest.raises(ValueError, match="same kv head count"):
        linear_attention(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
        linear_attention(q, k, v, q_segment_ids=SORTED)
