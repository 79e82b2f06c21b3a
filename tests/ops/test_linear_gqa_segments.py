"""The linear-attention engine's grouped-query heads and packed segments, and the kernel variants on them.

- GQA: the engine on phi(K), V of Hkv < H heads equals the engine on them repeated per query
  head, forward and backward (the gradient of a shared kv head is the sum over its group);
  both equal the quadratic reference, which reads kv head h // G by index.
- Segments: the engine equals the quadratic reference (pairs of one segment only) forward and
  backward, gradients by name, for each layout the engine handles differently: sorted ids
  (runs), unsorted ids (sorted into runs), different query and key ids and cross attention
  (one merged sequence); causal and bidirectional, with kv_mask and FAVOR+ log scales.
- linear, performer and cosformer: a packed batch equals each sequence run alone, forward and
  backward (cosformer's positions restart per segment), causal and bidirectional.
- Decoding with GQA (state of Hkv heads): prefill + steps == the causal forward.
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


def _grads(fn, args, w):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_repeated_kv_and_reference(causal):
    q, k, v, l = _inputs()
    w = random_arrays(9, (B, T, H, DV))[0]
    kw = dict(causal=causal, kv_mask=KV_MASK, eps=0.0)
    ours = lambda q, k, v, l: linear_attention(q, k, v, k_log_scale=l, chunk_size=CHUNK, **kw)  # noqa: E731
    ref = lambda q, k, v, l: linear_attention_quadratic(q, k, v, k_log_scale=l, **kw)  # noqa: E731
    gqa = jax.jit(ours)(q, k, v, l)
    rep = jax.jit(ours)(q, _repeat(k), _repeat(v), _repeat(l))
    assert_close("out vs repeated", gqa, rep, rtol=1e-5, atol=1e-6)
    assert_close("out vs reference", gqa, ref(q, k, v, l), rtol=1e-5, atol=1e-6)
    g_gqa = _grads(ours, (q, k, v, l), w)
    g_rep = _grads(ours, (q, _repeat(k), _repeat(v), _repeat(l)), w)
    g_ref = _grads(ref, (q, k, v, l), w)
    for i, name in enumerate(("dphi_q", "dphi_k", "dv", "dlog_scale")):
        want = g_rep[i] if i == 0 else _group_sum(g_rep[i])
        assert_close(f"{name} vs repeated", g_gqa[i], want, rtol=1e-4, atol=1e-5)
        assert_close(f"{name} vs reference", g_gqa[i], g_ref[i], rtol=1e-4, atol=1e-5)


LAYOUTS = {  # name: (T, S, q ids, kv ids)
    "sorted": (T, T, SORTED, SORTED),
    "unsorted": (T, T, UNSORTED, UNSORTED),
    "different_ids": (T, T, SORTED, UNSORTED),
    "cross": (T, 17, UNSORTED, UNSORTED[:, ::-1][:, :17]),
}


@pytest.mark.parametrize("layout,causal,scaled", [
    ("sorted", True, True), ("sorted", False, False), ("unsorted", True, False),
    ("unsorted", False, True), ("different_ids", True, True), ("cross", False, True),
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

    assert_close("out", jax.jit(ours)(q, k, v, l), ref(q, k, v, l), rtol=1e-5, atol=1e-6)
    names = ("dphi_q", "dphi_k", "dv", "dlog_scale" if scaled else "dlog_scale_unused")
    for name, a, b in zip(names, _grads(ours, (q, k, v, l), w), _grads(ref, (q, k, v, l), w)):
        assert_close(name, a, b, rtol=1e-4, atol=1e-5)


def test_segment_outputs_ignore_other_segments_bit_for_bit():
    """A NaN anywhere in another sequence of the row never reaches a segment (forward)."""
    q, k, v, l = _inputs(seed=3)
    kw = dict(q_segment_ids=SORTED, kv_segment_ids=SORTED, chunk_size=CHUNK)
    other = (SORTED == 0)[:, :, None, None]  # batch 0: segment 0 is token 0; batch 1: tokens 0..14
    for causal in (False, True):
        clean = linear_attention(q, k, v, causal=causal, k_log_scale=l, **kw)
        dirty = linear_attention(q, jnp.where(other, jnp.nan, k), jnp.where(other, jnp.inf, v), causal=causal,
                                 k_log_scale=jnp.where(other[..., 0], 1e4, l), **kw)
        seen = np.asarray(other[..., 0, 0])  # [B, T]: the tokens of the poisoned sequence
        assert np.isnan(np.asarray(dirty)[seen]).all()  # they see the NaN keys
        np.testing.assert_array_equal(np.asarray(dirty)[~seen], np.asarray(clean)[~seen])


# ------------------------------------------------------------------- the kernel variants

KERNELS = {"linear": {}, "performer": {"num_features": 8, "redraw": False}, "cosformer": {}}
D = 8


def _variant(name, num_kv_heads=H):
    return ea.build(name, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(0), num_kv_heads=num_kv_heads,
                    chunk_size=CHUNK, **KERNELS[name])


def test_kernel_variants_claim_gqa_and_segments():
    for name in KERNELS:
        c = ea.get_spec(name).capabilities
        assert c.gqa and c.segments, name


@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_each_sequence_alone_forward_and_backward(causal):
    """Row 0 packs sequences of 5, 14 and 10 tokens (with GQA); each is also run alone."""
    lengths = (5, 14, 10)
    L = sum(lengths)
    q, k, v, w = random_arrays(4, (1, L, H, D), (1, L, HKV, D), (1, L, HKV, D), (1, L, H, D))
    ids = jnp.asarray(np.repeat(np.arange(3), lengths)[None], jnp.int32)
    starts = np.cumsum((0,) + lengths)
    for name in KERNELS:
        module = _variant(name, HKV)
        graphdef, state = nnx.split(module)

        def run(q, k, v, ids=None):
            mask = ea.Mask(causal=causal, q_segment_ids=ids, kv_segment_ids=ids)
            return nnx.merge(graphdef, state, copy=True)(q, k, v, mask=mask)

        packed = jax.jit(lambda q, k, v: run(q, k, v, ids))
        g_packed = jax.grad(lambda q, k, v: jnp.sum(packed(q, k, v) * w), (0, 1, 2))(q, k, v)
        out = packed(q, k, v)
        for a, b in zip(starts[:-1], starts[1:]):
            piece = lambda x: x[:, a:b]  # noqa: E731
            alone = jax.jit(run)(piece(q), piece(k), piece(v))
            assert_close(f"{name} out [{a}:{b}]", piece(out), alone, rtol=1e-5, atol=1e-6)
            g_alone = jax.grad(lambda q, k, v: jnp.sum(run(q, k, v) * piece(w)), (0, 1, 2))(piece(q), piece(k), piece(v))
            for g_name, gp, ga in zip(("dq", "dk", "dv"), g_packed, g_alone):
                assert_close(f"{name} {g_name} [{a}:{b}]", piece(gp), ga, rtol=1e-4, atol=1e-5)


def test_gqa_decoding_equals_causal_forward():
    """init_state holds Hkv heads; prefill of 7 tokens + steps == the causal forward."""
    N, P = 13, 7
    q, k, v = random_arrays(5, (B, N, H, D), (B, N, HKV, D), (B, N, HKV, D))
    for name in KERNELS:
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
