"""``moba``: the chunked, gathering fast path equals the dense reference of the same selection
(ops/reference/selection.py) forward and backward; the selection obeys MoBA's rules; every
block selected is full attention; masked keys never matter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from conftest import make_qkv
from efficient_attn.ops.reference.selection import moba_reference, moba_selected_blocks
from efficient_attn.variants import selection
from efficient_attn.variants.full import full_attention

H, D = 2, 8


def _qkv(T, S=None, seed=0, B=2):
    return make_qkv(T, S, B=B, H=H, D=D, seed=seed)


def _kv_mask(B, S, seed, p=0.25):
    return jnp.asarray(np.random.default_rng(seed).random((B, S)) > p)


def assert_close(name, got, want, tol=2e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol, err_msg=name)


def _fwd_and_grads(fn, q, k, v, seed=1):
    """fn's output and the gradients of <out, g> for a fixed random cotangent g (one jit)."""
    g = jax.random.normal(jax.random.key(seed), jax.eval_shape(fn, q, k, v).shape)

    @jax.jit
    def both(q, k, v, g):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(g)

    out, grads = both(q, k, v, g)
    return out, dict(zip(("dq", "dk", "dv"), grads))


def _build(T, **hp):
    return ea.build("moba", num_heads=H, head_dim=D, max_len=max(T, 64), **hp)


CASES = [  # T, S, block, top_k, causal, kv_mask
    (37, 37, 8, 2, True, True),
    (37, 37, 8, 2, False, True),
    (61, 61, 16, 3, True, False),
    (50, 29, 7, 2, False, True),  # cross attention, block not dividing S
]


@pytest.mark.parametrize("T,S,b,top_k,causal,masked", CASES)
def test_equals_dense_reference_forward_and_backward(T, S, b, top_k, causal, masked):
    q, k, v = _qkv(T, S, seed=T + S)
    kv = _kv_mask(2, S, seed=S) if masked else None
    attn = _build(max(T, S), block_size=b, top_k=top_k)
    mask = ea.Mask(causal=causal, kv_mask=kv)
    out, grads = _fwd_and_grads(lambda q, k, v: attn(q, k, v, mask=mask), q, k, v)
    ref_out, ref_grads = _fwd_and_grads(
        lambda q, k, v: moba_reference(q, k, v, block_size=b, top_k=top_k, causal=causal, kv_mask=kv), q, k, v
    )
    assert_close("out", out, ref_out)
    for name in ("dq", "dk", "dv"):
        assert_close(name, grads[name], ref_grads[name])
    # the pattern is genuinely sparse here: not everything is visible
    assert not np.allclose(out, full_attention(q, k, v, mask), atol=1e-3)


def test_chunked_queries_equal_one_chunk(monkeypatch):
    """Several query chunks (lax.map, checkpointed) give the result of a single chunk."""
    T, b = 45, 8
    q, k, v = _qkv(T, seed=3)
    kv = _kv_mask(2, T, seed=3)
    run = lambda: _fwd_and_grads(  # noqa: E731
        lambda q, k, v: selection.moba_attention(q, k, v, block_size=b, top_k=2, causal=True, kv_mask=kv), q, k, v
    )
    one_out, one_grads = run()
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 2 * H * 2 * b * D * 7)  # 7 queries per chunk
    many_out, many_grads = run()
    assert_close("out", many_out, one_out, tol=1e-6)
    for name in ("dq", "dk", "dv"):
        assert_close(name, many_grads[name], one_grads[name], tol=1e-6)


def _fast_selection(q, k, kv, b, top_k, causal):
    """The fast path's chosen blocks as a [B, H, T, NB] boolean picture."""
    qh, kh = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
    real = jnp.ones(k.shape[:2], bool) if kv is None else kv
    means, has_real = selection.block_means(jnp.where(real[:, None, :, None], kh, 0.0), real, b)
    table = selection.select_blocks(qh, means, has_real, jnp.arange(q.shape[1]), block_size=b, top_k=top_k,
                                    causal=causal)
    nb = means.shape[2]
    return jnp.any((table[..., None] == jnp.arange(nb)) & (table[..., None] >= 0), axis=-2)


@pytest.mark.parametrize("causal", [False, True])
def test_selection_rules(causal):
    """top_k blocks (fewer only when fewer are allowed); causal: own block always, no future
    block; a block without a real key never; the fast selection equals the reference's."""
    T, b, top_k = 64, 8, 3
    q, k, _ = _qkv(T, seed=11)
    kv = np.ones((2, T), bool)
    kv[0, 16:24] = False  # block 2 of batch 0 has no real key
    kv[1, 40:43] = False  # block 5 of batch 1 keeps some
    kv = jnp.asarray(kv)
    both = jax.jit(lambda q, k, kv: (_fast_selection(q, k, kv, b, top_k, causal),
                                     moba_selected_blocks(q, k, block_size=b, top_k=top_k, causal=causal, kv_mask=kv)))
    sel, ref = (np.asarray(x) for x in both(q, k, kv))
    np.testing.assert_array_equal(sel, ref)
    own = np.arange(T) // b
    assert not sel[0, :, :, 2].any(), "a block with no real key was selected"
    for bi in range(2):
        allowed = np.ones((T, T // b), bool)
        if causal:
            allowed = np.arange(T // b)[None, :] <= own[:, None]
        if bi == 0:
            allowed[:, 2] = False
        want_count = np.minimum(top_k, allowed.sum(-1))
        np.testing.assert_array_equal(sel[bi].sum(-1), np.broadcast_to(want_count, sel[bi].shape[:2]))
        assert not (sel[bi] & ~allowed).any(), "a disallowed (future or empty) block was selected"
        if causal:
            own_sel = sel[bi][:, np.arange(T), own]
            np.testing.assert_array_equal(own_sel, np.broadcast_to(own != 2 if bi == 0 else True, own_sel.shape))


def test_gate_picks_the_block_holding_the_matching_keys():
    """A key block whose mean is aligned with the query wins the gate."""
    T, b = 32, 8
    q = jnp.zeros((1, T, H, D)).at[:, :, :, 0].set(1.0)
    k = jnp.zeros((1, T, H, D)).at[:, 8:16, :, 0].set(5.0).at[:, 24:32, :, 0].set(-5.0)
    sel = np.asarray(jax.jit(lambda q, k: _fast_selection(q, k, None, b, 1, False))(q, k))
    assert sel[0, :, :, 1].all() and sel[0].sum() == H * T


@pytest.mark.parametrize("T,b,causal", [(37, 8, True), (64, 16, False)])
def test_every_block_selected_is_full_attention(T, b, causal):
    q, k, v = _qkv(T, seed=T)
    kv = _kv_mask(2, T, seed=T + 1)
    mask = ea.Mask(causal=causal, kv_mask=kv)
    attn = _build(T, block_size=b, top_k=-(-T // b))
    out, grads = _fwd_and_grads(lambda q, k, v: attn(q, k, v, mask=mask), q, k, v)
    ref_out, ref_grads = _fwd_and_grads(lambda q, k, v: full_attention(q, k, v, mask), q, k, v)
    assert_close("out", out, ref_out)
    for name in ("dq", "dk", "dv"):
        assert_close(name, grads[name], ref_grads[name])


def test_exact_limit_is_registered_at_the_default_block():
    spec = ea.get_spec("moba")
    assert spec.exact_limit(64) == {"top_k": 1} and spec.exact_limit(65) == {"top_k": 2}
    assert spec.budget.knob == "top_k"


def test_masked_keys_with_nan_and_inf_never_matter():
    causal = True
    T = 40
    q, k, v = _qkv(T, seed=5)
    kv = _kv_mask(2, T, seed=5, p=0.4)
    hide = ~kv[:, :, None, None]
    k_bad = jnp.where(hide, jnp.nan, k)
    v_bad = jnp.where(hide, jnp.inf, v)
    attn = _build(T, block_size=8, top_k=2)
    mask = ea.Mask(causal=causal, kv_mask=kv)
    out, grads = _fwd_and_grads(lambda q, k, v: attn(q, k, v, mask=mask), q, k, v)
    bad_out, bad_grads = _fwd_and_grads(lambda q, k, v: attn(q, k, v, mask=mask), q, k_bad, v_bad)
    assert_close("out", bad_out, out, tol=0)
    assert_close("dq", bad_grads["dq"], grads["dq"], tol=0)
    for name in ("dk", "dv"):  # the masked positions' gradients are zero, the others unchanged
        assert_close(name, bad_grads[name], grads[name], tol=0)
        assert not np.asarray(jnp.where(hide, bad_grads[name], 0.0)).any()


def test_fully_masked_rows_are_zero():
    T = 24
    q, k, v = _qkv(T, seed=7)
    kv = jnp.ones((2, T), bool).at[1].set(False)
    attn = _build(T, block_size=8, top_k=2)
    out = jax.jit(lambda q, k, v: attn(q, k, v, mask=ea.Mask(causal=True, kv_mask=kv)))(q, k, v)
    assert np.all(np.asarray(out[1]) == 0) and np.all(np.isfinite(np.asarray(out)))


def test_no_quadratic_intermediate():
    from jaxpr_tools import max_intermediate_elems

    T = 1024
    attn = ea.build("moba", num_heads=2, head_dim=16, max_len=T)
    x = jnp.zeros((1, T, 2, 16))
    fn = jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v, mask=ea.Mask(causal=True))), argnums=(0, 1, 2))
    assert max_intermediate_elems(fn, x, x, x) < T * T


@pytest.mark.parametrize("field,bad", [("block_size", 0), ("top_k", 0), ("top_k", 2.5), ("block_size", True)])
def test_config_validation(field, bad):
    with pytest.raises(ValueError, match=field):
        ea.build("moba", num_heads=H, head_dim=D, max_len=64, **{field: bad})
