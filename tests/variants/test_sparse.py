"""sparse_transformer, longformer, bigbird: the patterns are their papers', and exact at the limit.

The implied attention pattern is read by probing the built variant: with q = k = 0 every
visible key gets the same weight 1/|visible|, and v = identity returns the weights, so
``weight > 0`` is the mask. It is compared with a mask written directly from each paper's
definition (token level), not with the implementation's tables.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from conftest import build, make_qkv
from efficient_attn.ops.reference.softmax import softmax_attention
from efficient_attn.variants.sparse import BigBirdRandom, bigbird_random_blocks

H, D = 2, 8


_qkv = functools.partial(make_qkv, H=H, D=D)  # the shared helpers at this file's sizes
_build = functools.partial(build, H=H, D=D)


def _run(attn, q, k, v, mask=None):
    return jax.jit(lambda q, k, v: attn(q, k, v, mask=mask))(q, k, v)


def probe(attn, T, causal) -> np.ndarray:
    """[H, T, T] boolean: which keys each query attends to, read from the module's outputs."""
    z = jnp.zeros((1, T, H, D))
    eye = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (1, T, H, T))
    w = np.asarray(_run(attn, z, z, eye, ea.Mask(causal=causal))[0])  # [T, H, T]
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    return np.transpose(w > 0, (1, 0, 2))


def _ij(T):
    return np.arange(T)[:, None], np.arange(T)[None, :]


def _assert_values_match(attn, T, dense_mask, causal):
    """Beyond the support: the variant equals full attention restricted to the paper's mask."""
    q, k, v = _qkv(T, seed=T)
    kv = np.random.default_rng(T).random((2, T)) > 0.25
    got = _run(attn, q, k, v, ea.Mask(causal=causal, kv_mask=kv))
    want = softmax_attention(q, k, v, ea.Mask(kv_mask=kv, dense=jnp.asarray(dense_mask)[None]))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------
# Sparse Transformer (Child et al. 2019, section 4.2, figure 3)


def child_strided(T, l, causal):
    """Token-level strided pattern: A1 = the previous l positions, A2 = every l-th position."""
    i, j = _ij(T)
    a = (np.abs(i - j) < l) | ((i - j) % l == 0)
    return a & (j <= i) if causal else a


def child_fixed(T, l, c, causal):
    """Token-level fixed pattern: A1 = same block of l, A2 = the last c positions of every block."""
    i, j = _ij(T)
    a = (j // l == i // l) | (j % l >= l - c)
    return a & (j <= i) if causal else a


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode,T,l", [("strided", 37, 6), ("fixed", 50, 4)])
def test_sparse_transformer_token_patterns_are_the_papers(mode, T, l, causal):
    """block_size = 1: the paper's token patterns (fixed with c = 1), union of both heads."""
    attn = _build("sparse_transformer", block_size=1, stride=l, mode=mode)
    want = child_strided(T, l, causal) if mode == "strided" else child_fixed(T, l, 1, causal)
    seen = probe(attn, T, causal)
    for h in range(H):
        np.testing.assert_array_equal(seen[h], want)


@pytest.mark.parametrize("causal", [True, False])
def test_sparse_transformer_fixed_blocks_are_the_papers_fixed_pattern(causal):
    """block_size = b, stride = l blocks: the paper's fixed pattern with l_tok = l b and c = b."""
    b, l, T = 3, 4, 61
    attn = _build("sparse_transformer", block_size=b, stride=l, mode="fixed")
    want = child_fixed(T, l * b, b, causal)
    np.testing.assert_array_equal(probe(attn, T, causal)[0], want)
    _assert_values_match(attn, T, want, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_sparse_transformer_strided_blocks_are_the_block_pattern(causal):
    """b > 1: the strided pattern applied to block indices I = i // b, J = j // b."""
    b, l, T = 4, 3, 58
    attn = _build("sparse_transformer", block_size=b, stride=l, mode="strided")
    I, J = (x // b for x in _ij(T))
    want = (np.abs(I - J) < l) | ((I - J) % l == 0)
    if causal:
        want &= np.arange(T)[None, :] <= np.arange(T)[:, None]
    np.testing.assert_array_equal(probe(attn, T, causal)[1], want)
    _assert_values_match(attn, T, want, causal)


def test_sparse_transformer_default_stride_is_sqrt_of_blocks():
    T, b = 100, 4  # 25 blocks -> l = 5 blocks = 20 tokens, c = 4
    attn = _build("sparse_transformer", block_size=b)
    np.testing.assert_array_equal(probe(attn, T, True)[0], child_fixed(T, 5 * b, b, True))


@pytest.mark.parametrize("mode", ["fixed", "strided"])
@pytest.mark.parametrize("causal", [True, False])
def test_sparse_transformer_exact_when_stride_covers_sequence(mode, causal):
    T, b = 45, 4
    attn = _build("sparse_transformer", block_size=b, stride=math.ceil(T / b), mode=mode)
    q, k, v = _qkv(T)
    mask = ea.Mask(causal=causal, kv_mask=np.random.default_rng(1).random((2, T)) > 0.3)
    np.testing.assert_allclose(_run(attn, q, k, v, mask), softmax_attention(q, k, v, mask), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("hp,field", [({"mode": "dense"}, "mode"), ({"stride": 0}, "stride"), ({"block_size": 0}, "block_size"),
                                      ({"stride": 2.0}, "stride")])
def test_sparse_transformer_config_validation(hp, field):
    with pytest.raises(ValueError, match=field):
        _build("sparse_transformer", **hp)


# ---------------------------------------------------------------------------------------
# Longformer (Beltagy et al. 2020, section 3.1, figure 2 (a) and (d))


def beltagy(T, w, glob, causal):
    """Window of w // 2 on each side (before only when causal) + symmetric global positions."""
    i, j = _ij(T)
    near = (i - j <= w // 2) & (j - i <= (0 if causal else w // 2))
    g = np.zeros(T, bool)
    g[list(glob)] = True
    a = near | g[:, None] | g[None, :]
    return a & (j <= i) if causal else a


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,w,glob", [(53, 7, (0, 17, 52)), (64, 20, ()), (30, 200, (2, 3))])
def test_longformer_pattern_is_the_papers(T, w, glob, causal):
    attn = _build("longformer", window=w, global_tokens=glob)
    want = beltagy(T, w, glob, causal)
    np.testing.assert_array_equal(probe(attn, T, causal)[0], want)
    _assert_values_match(attn, T, want, causal)


@pytest.mark.parametrize("causal", [False, True])
def test_longformer_exact_when_every_token_is_global(causal):
    T = 33
    attn = _build("longformer", window=2, global_tokens=tuple(range(T)))
    q, k, v = _qkv(T)
    mask = ea.Mask(causal=causal, kv_mask=np.random.default_rng(2).random((2, T)) > 0.3)
    np.testing.assert_allclose(_run(attn, q, k, v, mask), softmax_attention(q, k, v, mask), atol=2e-5, rtol=2e-5)


def test_longformer_validation():
    for hp, field in (({"window": 1}, "window"), ({"global_tokens": (-1,)}, "global_tokens"),
                      ({"global_tokens": (3, 3)}, "duplicates"), ({"global_tokens": "0"}, "global_tokens")):
        with pytest.raises(ValueError, match=field):
            _build("longformer", **hp)
    assert _build("longformer", global_tokens=[9, 2]).config.global_tokens == (2, 9)
    q, k, v = _qkv(20)
    with pytest.raises(ValueError, match="global_tokens"):
        _build("longformer", global_tokens=(25,))(q, k, v)


# ---------------------------------------------------------------------------------------
# BigBird (Zaheer et al. 2020, section 2 and figure 1; ITC, block version of appendix D)


def zaheer(T, b, g, random_rows, causal):
    """Token mask from the block definition: global rows/columns, 3-block window, random blocks."""
    i, j = _ij(T)
    I, J = i // b, j // b
    a = (I < g) | (J < g) | ((I - J <= 1) & (J - I <= (0 if causal else 1)))
    R = np.zeros((math.ceil(T / b),) * 2, bool)
    for row, blocks in random_rows.items():
        R[row, [x for x in blocks if x >= 0]] = True
    a |= R[I, J]
    return a & (j <= i) if causal else a


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,b,g,r", [(77, 6, 1, 2), (64, 8, 2, 3), (50, 5, 0, 1)])
def test_bigbird_pattern_is_the_papers(T, b, g, r, causal):
    attn = _build("bigbird", block_size=b, num_global_blocks=g, num_random_blocks=r)
    table = np.asarray(attn.table(T, causal))  # [H, nb - g, g + window + r]
    seen = probe(attn, T, causal)
    for h in range(H):
        rand = {g + row: table[h, row, -r:] for row in range(table.shape[1])} if r else {}
        want = zaheer(T, b, g, rand, causal)
        np.testing.assert_array_equal(seen[h], want)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_values_match_full_with_the_pattern(causal):
    T, b, g, r = 70, 7, 1, 2
    attn = _build("bigbird", block_size=b, num_global_blocks=g, num_random_blocks=r)
    table = np.asarray(attn.table(T, causal))
    per_head = np.stack([zaheer(T, b, g, {g + x: table[h, x, -r:] for x in range(table.shape[1])}, causal) for h in range(H)])
    q, k, v = _qkv(T, seed=3)
    kv = np.random.default_rng(3).random((2, T)) > 0.25
    got = _run(attn, q, k, v, ea.Mask(causal=causal, kv_mask=kv))
    want = softmax_attention(q, k, v, ea.Mask(kv_mask=kv, dense=jnp.asarray(per_head)[None]))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_random_blocks_are_valid_draws(causal):
    """Distinct, outside the window and the global blocks (causal: before the window), as many as exist."""
    nb, g, r = 23, 2, 4
    u = jax.random.uniform(jax.random.key(0), (3, nb, r))
    rand = np.asarray(bigbird_random_blocks(u, nb, g, causal))
    for h in range(3):
        for row, I in enumerate(range(g, nb)):
            picks = rand[h, row][rand[h, row] >= 0]
            allowed = [J for J in range(g, nb) if (J < I - 1 if causal else abs(J - I) > 1)]
            assert len(picks) == min(r, len(allowed)) and len(set(picks)) == len(picks)
            assert set(picks) <= set(allowed)


def test_bigbird_random_blocks_are_uniform():
    """Each allowed block is picked with probability r / |allowed| (sampling without replacement)."""
    nb, g, r, draws = 12, 1, 3, 6000
    u = jax.random.uniform(jax.random.key(1), (draws, nb, r))
    rand = np.asarray(bigbird_random_blocks(u, nb, g, False))[:, 5 - g]  # query block 5
    allowed = [J for J in range(g, nb) if abs(J - 5) > 1]
    freq = np.array([(rand == J).sum() for J in allowed]) / draws
    np.testing.assert_allclose(freq, r / len(allowed), atol=0.03)


def test_bigbird_randomness_is_fixed_per_module_and_not_trained():
    T = 64
    a, b = _build("bigbird", block_size=4), _build("bigbird", block_size=4)
    c = _build("bigbird", block_size=4, seed=1)
    np.testing.assert_array_equal(a.table(T, False), b.table(T, False))
    assert not np.array_equal(np.asarray(a.table(T, False)), np.asarray(c.table(T, False)))
    t = np.asarray(a.table(T, False))
    assert not np.array_equal(t[0], t[1]), "heads should draw their own random blocks"
    assert len(jax.tree.leaves(nnx.state(a, nnx.Param))) == 0
    assert len(jax.tree.leaves(nnx.state(a, BigBirdRandom))) == 1
    q, k, v = _qkv(T)
    np.testing.assert_array_equal(_run(a, q, k, v), _run(a, q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_exact_with_all_blocks_global(causal):
    T, b = 45, 8
    attn = _build("bigbird", block_size=b, num_global_blocks=math.ceil(T / b), num_random_blocks=3)
    q, k, v = _qkv(T)
    mask = ea.Mask(causal=causal, kv_mask=np.random.default_rng(4).random((2, T)) > 0.3)
    np.testing.assert_allclose(_run(attn, q, k, v, mask), softmax_attention(q, k, v, mask), atol=2e-5, rtol=2e-5)


def test_bigbird_validation():
    for hp, field in (({"block_size": 0}, "block_size"), ({"num_global_blocks": -1}, "num_global_blocks"),
                      ({"num_random_blocks": 1.5}, "num_random_blocks")):
        with pytest.raises(ValueError, match=field):
            _build("bigbird", **hp)


# ---------------------------------------------------------------------------------------
# Memory: compiled only, N -> 4N (B=1, H=2, D=32)


def compiled_bytes(name, n, backward, *, max_len, H=2, D=32):
    attn = ea.build(name, num_heads=H, head_dim=D, max_len=max_len, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(attn)
    f = lambda q, k, v: nnx.merge(graphdef, state)(q, k, v)
    fn = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)) if backward else f
    spec = jax.ShapeDtypeStruct((1, n, H, D), jnp.float32)
    ma = jax.jit(fn).lower(spec, spec, spec).compile().memory_analysis()
    return ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes


@pytest.mark.parametrize("name", ["sparse_transformer", "longformer", "bigbird"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
def test_memory_grows_less_than_5x_from_n_to_4n(name, backward):
    small = compiled_bytes(name, 1024, backward, max_len=4096)
    large = compiled_bytes(name, 4096, backward, max_len=4096)
    assert large / small < 5.0, f"{name}: memory grew {large / small:.2f}x from N=1024 to 4096"
