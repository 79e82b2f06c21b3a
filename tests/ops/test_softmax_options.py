"""Grouped-query k/v, packed segments, soft cap and sinks in full, local and the block-sparse
engine (and the variants on it), against the dense einsum references.

Every case turns all four options on at once (kv heads Hkv = H / 2, two or three packed
sequences per row, a key-padding hole, a soft cap that the scaled-up logits reach, random
sink logits) and checks the output and the gradients dq, dk, dv and d_sinks, each by name:

- the engine (``block_sparse_attention``, head-major) against ``block_sparse_reference``
  for a shared banded table (the folded-group path) and a per-head random table (gather by
  index), out and lse;
- ``full`` (with a per-head dense mask) and ``local``, ``sparse_transformer``, ``longformer``
  and ``bigbird`` at settings where their patterns are sparse, against
  ``softmax_attention`` given the variant's pattern as a dense mask;
- the engine with grouped k/v equals the engine on k/v repeated per query head, and the
  gradient of a shared kv head is the sum over its group.

Bad options (soft cap <= 0 or non-finite, sinks not a bool) are refused at build, and
decoding with softcap or sinks is refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from conftest import assert_close, random_arrays
from efficient_attn.ops.block_sparse import banded_table, block_sparse_attention, num_blocks
from efficient_attn.ops.reference.softmax import block_sparse_reference, block_table_visibility, softmax_attention
from efficient_attn.variants.sparse import sparse_transformer_table

B, T, H, HKV, D = 2, 32, 4, 2, 8
CAP = 2.0
SINKS = jnp.asarray([0.5, -1.0, 1.5, 0.0])
RTOL, ATOL = 2e-4, 2e-5
GRAD_TOL = dict(rtol=1e-3, atol=1e-4)


def _segments():
    """Row 0: three sequences (9, 15, 8 tokens); row 1: two (20, 12); boundaries off every block grid."""
    ids = np.zeros((B, T), np.int32)
    ids[0, 9:], ids[0, 24:] = 1, 2
    ids[1, 20:] = 1
    return jnp.asarray(ids)


def _inputs(seed: int):
    q, k, v, w = random_arrays(seed, (B, T, H, D), (B, T, HKV, D), (B, T, HKV, D), (B, T, H, D))
    return 3.0 * q, 3.0 * k, v, w  # logits past the cap


def _mask(causal: bool, dense=None) -> ea.Mask:
    seg = _segments()
    kv = jnp.ones((B, T), bool).at[0, 4].set(False).at[1, 27].set(False)
    return ea.Mask(causal=causal, kv_mask=kv, dense=dense, q_segment_ids=seg, kv_segment_ids=seg)


def _agree(ours, ref, args, names):
    """out, then the gradient of sum(out * w) for each argument, by name; one jit per side."""
    *xs, w = args

    def run(fn):
        loss = lambda *a: jnp.sum(fn(*a) * w)  # noqa: E731
        return jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=tuple(range(len(a))))(*a)))(*xs)

    (out, grads), (want, want_grads) = run(ours), run(ref)
    assert_close("out", out, want, rtol=RTOL, atol=ATOL)
    for name, g, r in zip(names, grads, want_grads):
        assert np.all(np.isfinite(np.asarray(g))), f"{name} is not finite"
        assert_close(name, g, r, **GRAD_TOL)
    return out


# ------------------------------------------------------------------------------ the engine


def _head_major(x):
    return x.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("run_elements", [None, 1], ids=["one_run", "run_per_block"])
@pytest.mark.parametrize("pattern", ["shared_band", "per_head_random"])
def test_engine_matches_reference_with_every_option(pattern, run_elements, monkeypatch):
    """Every option at once; ``run_per_block`` also cuts the query blocks into runs of one
    block, so the backward adds each run's dk, dv into the shared accumulators (both the
    folded-group and the per-head gather paths)."""
    from efficient_attn.ops import block_sparse

    monkeypatch.setattr(block_sparse, "CHUNK_ELEMENTS", run_elements)
    q, k, v, w = (_head_major(x) for x in _inputs(1))
    seg, kv = _segments(), _mask(True).kv_mask
    b = 8 if pattern == "shared_band" else 4
    nb = num_blocks(T, b)
    if pattern == "shared_band":  # causal sliding window of 10: the folded-group path
        table, kw = banded_table(nb, nb, b, b, 10, 0), dict(band=(10, 0))
    else:  # a different random table per head (gather from kv head h // G by index)
        rng = np.random.default_rng(0)
        table = np.stack([[np.sort(rng.choice(nb, 3, replace=False)) for _ in range(nb)] for _ in range(H)])
        table = table.astype(np.int32)
        table[:, 2, 1:] = -1
        kw = {}
    kw = dict(block_q=b, block_k=b, causal=True, kv_valid=kv, q_seg=seg, k_seg=seg, softcap=CAP, **kw)

    def ours(q, k, v, s):
        out, lse = block_sparse_attention(q, k, v, table, sinks=s, **kw)
        return out + 0.1 * jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]  # lse's gradient counts too

    def ref(q, k, v, s):
        out, lse = block_sparse_reference(q, k, v, table, sinks=s, **kw)
        return out + 0.1 * jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]

    _agree(ours, ref, (q, k, v, SINKS, w), ("dq", "dk", "dv", "d_sinks"))


def test_engine_gqa_equals_repeated_kv():
    """Grouped k/v (folded path, shared table) == the engine on k/v repeated per query head;
    dk, dv of a shared head == the group's sum of the repeated run's."""
    q, k, v, w = (_head_major(x) for x in _inputs(2))
    nb = num_blocks(T, 8)
    table = banded_table(nb, nb, 8, 8, 6, 6)
    kw = dict(block_q=8, block_k=8, band=(6, 6), kv_valid=_mask(False).kv_mask, softcap=CAP)
    rep = lambda x: jnp.repeat(x, H // HKV, axis=1)  # noqa: E731
    group_sum = lambda g: g.reshape((B, HKV, H // HKV) + g.shape[2:]).sum(2)  # noqa: E731
    f = jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(block_sparse_attention(q, k, v, table, **kw)[0] * w), argnums=(0, 1, 2)))
    (l_gqa, g_gqa), (l_rep, g_rep) = f(q, k, v), f(q, rep(k), rep(v))
    assert_close("loss", l_gqa, l_rep, rtol=1e-5, atol=1e-5)
    assert_close("dq", g_gqa[0], g_rep[0], **GRAD_TOL)
    assert_close("dk", g_gqa[1], group_sum(g_rep[1]), **GRAD_TOL)
    assert_close("dv", g_gqa[2], group_sum(g_rep[2]), **GRAD_TOL)


# ------------------------------------------------------------------------------ the variants


def _band(T, left, right):
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    return (j >= i - left) & (j <= i + right)


def _pattern(name: str, module, causal: bool) -> np.ndarray:
    """The [1, 1|H, T, T] key pattern of a variant at the settings below, written out densely."""
    cfg = module.config
    if name == "local":
        return _band(T, cfg.window, 0 if causal else cfg.window)[None, None]
    if name == "sparse_transformer":
        nb = num_blocks(T, cfg.block_size)
        table = sparse_transformer_table(nb, cfg.stride, cfg.mode, causal)
        return np.asarray(block_table_visibility(table, T, T, block_q=cfg.block_size, block_k=cfg.block_size))
    if name == "longformer":
        half = cfg.window // 2
        glob = np.zeros(T, bool)
        glob[list(cfg.global_tokens)] = True
        return (_band(T, half, 0 if causal else half) | glob[None, :] | glob[:, None])[None, None]
    if name == "bigbird":  # global rows see every block; the others their row of the module's table
        b, g = cfg.block_size, cfg.num_global_blocks
        nb = num_blocks(T, b)
        rest = np.asarray(module.table(T, causal))
        full_rows = np.broadcast_to(np.arange(nb, dtype=np.int32), (H, g, nb))
        width = max(nb, rest.shape[-1])
        pad = lambda t: np.pad(t, ((0, 0), (0, 0), (0, width - t.shape[-1])), constant_values=-1)  # noqa: E731
        table = np.concatenate([pad(full_rows), pad(rest)], axis=1)
        return np.asarray(block_table_visibility(table, T, T, block_q=b, block_k=b))
    raise AssertionError(name)


VARIANT_CASES = [  # (variant, sparse settings, causal)
    ("local", {"window": 5}, False),  # causal bands: the engine's shared_band case
    ("sparse_transformer", {"block_size": 4, "stride": 3, "mode": "strided"}, False),
    ("longformer", {"window": 8, "global_tokens": (0, 17)}, True),
    ("bigbird", {"block_size": 4, "num_global_blocks": 1, "num_random_blocks": 2}, False),
]


def _with_sinks(module):
    """f(q, k, v, sinks) over a copy of the module whose sink logits are ``sinks``."""
    graphdef, state = nnx.split(module)

    def f(q, k, v, sinks, mask):
        m = nnx.merge(graphdef, state, copy=True)
        m.sinks.value = sinks
        return m(q, k, v, mask=mask)

    return f


@pytest.mark.parametrize("name,setting,causal", VARIANT_CASES, ids=[f"{c[0]}-{'causal' if c[2] else 'bidir'}" for c in VARIANT_CASES])
def test_variant_matches_dense_reference_with_every_option(name, setting, causal):
    module = ea.build(name, num_heads=H, head_dim=D, max_len=64, num_kv_heads=HKV, rngs=nnx.Rngs(0),
                      softcap=CAP, sinks=True, **setting)
    pattern = _pattern(name, module, causal)
    assert not pattern.all(), f"{name} at {setting}: the pattern should be sparse at T={T}"
    q, k, v, w = _inputs(3)
    mask = _mask(causal)
    f = _with_sinks(module)
    ours = lambda q, k, v, s: f(q, k, v, s, mask)  # noqa: E731
    dense = _mask(causal, dense=jnp.asarray(pattern))
    ref = lambda q, k, v, s: softmax_attention(q, k, v, dense, softcap=CAP, sinks=s)  # noqa: E731
    _agree(ours, ref, (q, k, v, SINKS, w), ("dq", "dk", "dv", "d_sinks"))


def test_full_matches_reference_with_every_option():
    """full with a per-head dense mask too (its grouped einsum reads the mask per query head)."""
    q, k, v, w = _inputs(4)
    dense = jnp.asarray(np.random.default_rng(4).random((1, H, T, T)) > 0.2)
    mask = _mask(True, dense=dense)
    module = ea.build("full", num_heads=H, head_dim=D, max_len=64, num_kv_heads=HKV, softcap=CAP, sinks=True)
    f = _with_sinks(module)
    out = _agree(lambda q, k, v, s: f(q, k, v, s, mask),
                 lambda q, k, v, s: softmax_attention(q, k, v, mask, softcap=CAP, sinks=s),
                 (q, k, v, SINKS, w), ("dq", "dk", "dv", "d_sinks"))
    assert float(jnp.max(jnp.abs(jnp.sum(out, -1)))) > 0  # not a trivially zero output


# ------------------------------------------------------------------------------ refusals

OPTION_VARIANTS = ["full", "local", "sparse_transformer", "longformer", "bigbird"]


@pytest.mark.parametrize("name", OPTION_VARIANTS)
def test_bad_options_refused_with_the_fix(name):
    for cap in (0.0, -1.0, float("inf"), float("nan"), "50"):
        with pytest.raises(ValueError, match="softcap must be None or a finite number > 0"):
            ea.build(name, num_heads=2, head_dim=8, max_len=32, softcap=cap)
    with pytest.raises(ValueError, match="sinks must be True or False"):
        ea.build(name, num_heads=2, head_dim=8, max_len=32, sinks=1)
    module = ea.build(name, num_heads=2, head_dim=8, max_len=32, softcap=5.0)
    with pytest.raises(ValueError, match="decoding with softcap or sinks is not implemented"):
        module.init_state(1, 16)
