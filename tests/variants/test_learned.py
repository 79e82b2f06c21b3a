"""The math of the learned variants: ``synthesizer`` and ``sinkhorn``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from conftest import build, make_qkv
from efficient_attn.ops.reference.sinkhorn import key_blocks, sinkhorn_attention_reference
from efficient_attn.ops.reference.softmax import softmax_attention
from efficient_attn.variants.learned import sinkhorn_log

H, D = 2, 8


_qkv = functools.partial(make_qkv, H=H, D=D)  # the shared helpers at this file's sizes
_build = functools.partial(build, H=H, D=D, max_len=64)


_JITTED = {}


def run(attn, q, k, v, mask=None):
    """``attn(q, k, v, mask=mask)`` through one cached jit per module (eager dispatch is slow here)."""
    if id(attn) not in _JITTED:
        graphdef, state = nnx.split(attn)
        fn = jax.jit(lambda q, k, v, mask: nnx.merge(graphdef, state)(q, k, v, mask=mask))
        _JITTED[id(attn)] = (attn, fn)  # keep attn alive so its id is not reused
    return _JITTED[id(attn)][1](q, k, v, mask)


# ----------------------------------------------------------------------------- synthesizer


@pytest.mark.parametrize("rank", [None, 4])
def test_synthesizer_random_ignores_q_and_k(rank):
    attn = _build("synthesizer", rank=rank)
    q, k, v = _qkv(40)
    q2, k2, _ = _qkv(40, seed=5)
    out = run(attn, q, k, v)
    np.testing.assert_allclose(run(attn, q2, k2, v), out, rtol=1e-6, atol=1e-6)
    # and it is exactly softmax(R[:T, :S]) V with the module's own logits
    if rank is None:
        logits = attn.logits[...][:, :40, :40]
    else:
        logits = jnp.einsum("htr,hrs->hts", attn.left[...][:, :40], attn.right[...][:, :, :40])
    want = jnp.einsum("hts,bshd->bthd", jax.nn.softmax(logits, -1), v)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    # the pattern is not uniform (so it is not mean pooling in disguise)
    assert float(jnp.std(jax.nn.softmax(logits, -1))) > 1e-3


def test_synthesizer_dense_reads_q_not_k():
    attn = _build("synthesizer", mode="dense")
    q, k, v = _qkv(30)
    q2, k2, _ = _qkv(30, seed=3)
    out = run(attn, q, k, v)
    np.testing.assert_allclose(run(attn, q, k2, v), out, rtol=1e-6, atol=1e-6)
    assert not np.allclose(run(attn, q2, k, v), out, atol=1e-3)
    # row i depends only on q_i: changing q at one position changes one output row
    q3 = q.at[:, 7].set(q2[:, 7])
    diff = np.abs(np.asarray(run(attn, q3, k, v) - out)).max(axis=(0, 2, 3))
    assert diff[7] > 1e-4 and np.all(np.delete(diff, 7) == 0)


@pytest.mark.parametrize("mode", ["random", "dense"])
def test_synthesizer_causal_no_leak_and_masks(mode):
    attn = _build("synthesizer", mode=mode)
    T, cut = 24, 10
    q, k, v = _qkv(T)
    q2, k2, v2 = _qkv(T, seed=9)
    causal = ea.Mask(causal=True)
    base = run(attn, q, k, v, causal)
    fut = jnp.arange(T)[None, :, None, None] >= cut
    changed = run(attn, jnp.where(fut, q2, q), jnp.where(fut, k2, k), jnp.where(fut, v2, v), causal)
    np.testing.assert_allclose(changed[:, :cut], base[:, :cut], rtol=1e-6, atol=1e-6)
    assert not np.allclose(changed[:, cut:], base[:, cut:])
    # first query under causal masking sees only key 0: output is v_0 exactly
    np.testing.assert_allclose(base[:, 0], v[:, 0], rtol=1e-5, atol=1e-6)

    m = np.ones((2, T), bool)
    m[0, 3:11] = False
    m[1] = False  # every key masked
    km = ea.Mask(kv_mask=m)
    out = run(attn, q, k, v, km)
    hidden = jnp.asarray(~m)[:, :, None, None]
    np.testing.assert_allclose(run(attn, q, jnp.where(hidden, k2, k), jnp.where(hidden, v2, v), km)[0], out[0],
                               rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(out)) and np.all(np.asarray(out[1]) == 0)


def test_synthesizer_cross_slices_position_tables():
    attn = _build("synthesizer", rank=None)
    q, k, v = _qkv(12, 20)
    out = run(attn, q, k, v)
    want = jnp.einsum("hts,bshd->bthd", jax.nn.softmax(attn.logits[...][:, :12, :20], -1), v)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_len"):
        attn(*_qkv(12, 65))


def test_synthesizer_fixed_is_not_trained_and_grads_finite():
    fixed = _build("synthesizer", fixed=True)
    assert not jax.tree_util.tree_leaves(nnx.state(fixed, nnx.Param))
    trained = _build("synthesizer", mode="dense")
    graphdef, params, rest = nnx.split(trained, nnx.Param, ...)
    q, k, v = _qkv(16)

    def loss(p, q, v):
        return jnp.sum(nnx.merge(graphdef, p, rest)(q, k, v, mask=ea.Mask(causal=True)) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, q, v)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads[1]).sum()) > 0  # dense mode: the query drives the logits


@pytest.mark.parametrize(
    "hp,match",
    [({"mode": "sparse"}, "mode"), ({"rank": 0}, "rank"), ({"fixed": True, "mode": "dense"}, "fixed"),
     ({"dense_hidden": -1}, "dense_hidden")],
)
def test_synthesizer_config_errors(hp, match):
    with pytest.raises(ValueError, match=match):
        _build("synthesizer", **hp)


# ----------------------------------------------------------------------------- sinkhorn


def test_sinkhorn_balancing_is_doubly_stochastic():
    logits = jax.random.normal(jax.random.key(0), (4, 12, 12))  # unit-variance logits after 1/tau
    p = sinkhorn_log(logits, 8)  # the default iteration count
    np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-5)  # columns: normalised last
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-3)  # rows: converged
    assert bool(jnp.all(p >= 0))
    one = sinkhorn_log(logits, 1)
    assert float(jnp.abs(one.sum(-1) - 1).max()) > 0.05  # one iteration (LRA's default) is far off
    # sharper logits need more iterations, and the row error keeps falling
    sharp = 2.0 * logits
    errs = [float(jnp.abs(sinkhorn_log(sharp, n).sum(-1) - 1).max()) for n in (1, 4, 16, 32)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3, errs


def test_sinkhorn_causal_balancing_uses_only_earlier_rows():
    logits = jax.random.normal(jax.random.key(1), (10, 10)) * 2
    p = sinkhorn_log(logits, 6, causal=True)
    assert bool(jnp.all(jnp.triu(p) == 0))  # only strictly past blocks
    np.testing.assert_allclose(p[1:].sum(-1), 1.0, atol=0.2)  # rows stay roughly normalised
    later = logits.at[6:].set(jax.random.normal(jax.random.key(2), (4, 10)) * 5)
    np.testing.assert_allclose(sinkhorn_log(later, 6, causal=True)[:6], p[:6], rtol=1e-6, atol=1e-7)


def test_sinkhorn_module_sort_matrix_is_balanced():
    attn = _build("sinkhorn", max_len=96, block_size=8)
    q, k, v = _qkv(96)
    kb = (3 * k).reshape(2, 12, 8, H, D).transpose(0, 3, 1, 2, 4)  # sharp block summaries
    graphdef, state = nnx.split(attn)
    p = jax.jit(lambda kb: nnx.merge(graphdef, state).sort_matrix(kb, jnp.ones((2, 12, 8), bool), False))(kb)
    assert p.shape == (2, H, 12, 12)
    np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-5)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-2)
    assert float(p.max()) > 2.0 / 12  # not the uniform matrix


def _dense_sinkhorn(attn, q, k, v, kv_mask, causal):
    """The dense reference (ops/reference/sinkhorn.py) with the module's own sort matrix."""
    b = attn.config.block_size
    kv_mask = None if kv_mask is None else jnp.asarray(kv_mask)
    graphdef, state = nnx.split(attn)

    @jax.jit
    def dense(q, k, v):
        kb, valid = key_blocks(k, kv_mask, b)
        sort = nnx.merge(graphdef, state).sort_matrix(kb, valid, causal)
        return sinkhorn_attention_reference(q, k, v, sort, block_size=b, kv_mask=kv_mask, causal=causal)

    return dense(q, k, v)


@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_matches_dense_reference(causal):
    attn = _build("sinkhorn", max_len=32, block_size=4, sort_hidden=6, temperature=0.5)
    q, k, v = _qkv(18, Dv=5)  # 18 = 4 blocks + 2 padded tokens, Dv != D
    m = np.ones((2, 18), bool)
    m[0, 2:9] = False
    out = run(attn, q, k, v, ea.Mask(causal=causal, kv_mask=m))
    want = _dense_sinkhorn(attn, q, k, v, m, causal)
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_single_block_is_softmax_attention(causal):
    """With N <= b the sorted block is the own block again (P = [[1]]), so the output is exact."""
    attn = _build("sinkhorn", max_len=64)
    q, k, v = _qkv(40)
    m = np.ones((2, 40), bool)
    m[1, 30:] = False
    mask = ea.Mask(causal=causal, kv_mask=m)
    np.testing.assert_allclose(run(attn, q, k, v, mask), softmax_attention(q, k, v, mask), rtol=1e-4, atol=1e-5)


def test_sinkhorn_causal_no_leak_mid_block():
    attn = _build("sinkhorn", max_len=64, block_size=4)
    T = 42
    q, k, v = _qkv(T)
    q2, k2, v2 = _qkv(T, seed=11)
    m = np.ones((2, T), bool)
    m[:, 5] = False
    for cut in (13, 16, 30):  # mid-block and block-aligned
        mask = ea.Mask(causal=True, kv_mask=m)
        base = run(attn, q, k, v, mask)
        fut = jnp.arange(T)[None, :, None, None] >= cut
        changed = run(attn, jnp.where(fut, q2, q), jnp.where(fut, k2, k), jnp.where(fut, v2, v), mask)
        np.testing.assert_allclose(changed[:, :cut], base[:, :cut], rtol=1e-5, atol=1e-6)
        assert not np.allclose(changed[:, cut:], base[:, cut:])
    # the sorted blocks are used: block 3 mixes earlier blocks, so early keys move later outputs
    k3 = k.at[:, 0].add(3.0)
    causal = ea.Mask(causal=True)
    assert not np.allclose(run(attn, q, k3, v, causal)[:, 12:], run(attn, q, k, v, causal)[:, 12:])


def test_sinkhorn_kv_mask_invariance_and_empty_rows():
    attn = _build("sinkhorn", max_len=64, block_size=4)
    T = 30
    q, k, v = _qkv(T)
    _, k2, v2 = _qkv(T, seed=4)
    m = np.ones((2, T), bool)
    m[0, 4:12] = False  # two whole blocks and some more
    m[0, 21] = False
    m[1] = False
    mask = ea.Mask(kv_mask=m)
    out = run(attn, q, k, v, mask)
    hidden = jnp.asarray(~m)[:, :, None, None]
    np.testing.assert_allclose(run(attn, q, jnp.where(hidden, k2, k), jnp.where(hidden, v2, v), mask), out,
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(out)) and np.all(np.asarray(out[1]) == 0)
    # queries of a fully masked block still see the sorted (real) keys: nonzero outputs
    assert float(jnp.abs(out[0, 4:8]).min()) > 0


def test_sinkhorn_grads_finite():
    attn = _build("sinkhorn", max_len=64, block_size=4, sort_hidden=4)
    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)
    q, k, v = _qkv(26)
    m = np.ones((2, 26), bool)
    m[1] = False
    m[0, :8] = False

    def loss(p, q, k, v, causal):
        return jnp.sum(nnx.merge(graphdef, p, rest)(q, k, v, mask=ea.Mask(causal=causal, kv_mask=m)) ** 2)

    for causal in (False, True):
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)(params, q, k, v, causal)
        for g in jax.tree_util.tree_leaves(grads):
            assert bool(jnp.all(jnp.isfinite(g)))
        assert float(jnp.abs(grads[0]["w_sort"][...]).sum()) > 0  # the sorting network learns


def test_sinkhorn_refuses_cross_and_bad_config():
    attn = _build("sinkhorn")
    with pytest.raises(ValueError, match="cross"):
        attn(*_qkv(16, 24))
    for hp in ({"block_size": 0}, {"sinkhorn_iterations": 0}, {"temperature": 0.0}, {"sort_hidden": -1}):
        with pytest.raises(ValueError, match=next(iter(hp))):
            _build("sinkhorn", **hp)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
def test_sinkhorn_memory_is_subquadratic(backward):
    """Compiled memory (compile only, nothing runs) grows < 5x from N to 4N (16x if quadratic)."""
    attn = ea.build("sinkhorn", num_heads=1, head_dim=16, max_len=4096)
    graphdef, state = nnx.split(attn)

    def f(q, k, v):
        return nnx.merge(graphdef, state)(q, k, v)

    fn = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)) if backward else f

    def size(n):
        spec = jax.ShapeDtypeStruct((1, n, 1, 16), jnp.float32)
        ma = jax.jit(fn).lower(spec, spec, spec).compile().memory_analysis()
        return ma.temp_size_in_bytes + ma.output_size_in_bytes + ma.argument_size_in_bytes

    growth = size(4096) / size(1024)
    assert growth < 5.0, growth
