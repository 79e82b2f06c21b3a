"""The base class's call as a careless user meets it: every bad input named, numpy accepted."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea


def _np_qkv(B=1, T=8, H=2, D=4):
    rng = np.random.default_rng(0)
    return tuple(rng.normal(size=(B, T, H, D)).astype(np.float32) for _ in range(3))


@pytest.mark.parametrize("causal", ["no", 1, None, np.array(True)])
def test_causal_must_be_a_bool(causal):
    with pytest.raises(TypeError, match=r"full: Mask.causal must be a bool"):
        ea.build("full", num_heads=2, head_dim=4, max_len=16)(*_np_qkv(), mask=ea.Mask(causal=causal))


def test_numpy_bool_causal_is_a_bool():
    out = ea.build("full", num_heads=2, head_dim=4, max_len=16)(*_np_qkv(), mask=ea.Mask(causal=np.bool_(True)))
    ref = ea.build("full", num_heads=2, head_dim=4, max_len=16)(*_np_qkv(), mask=ea.Mask(causal=True))
    np.testing.assert_array_equal(out, ref)


def test_traced_causal_names_the_fix():
    attn = ea.build("full", num_heads=2, head_dim=4, max_len=16)
    q, k, v = _np_qkv()
    f = jax.jit(lambda c: attn(q, k, v, mask=ea.Mask(causal=c)))
    with pytest.raises(TypeError, match=r"Mask.causal is a traced value.*static_argnames"):
        f(True)


@pytest.mark.parametrize("name", ["blockwise", "full", "local", "linear"])
def test_numpy_inputs_and_masks_equal_jax_ones(name):
    """numpy q, k, v and a numpy or list kv_mask work for every variant as jax arrays do
    (blockwise once raised TracerArrayConversionError on them)."""
    attn = ea.build(name, num_heads=2, head_dim=4, max_len=16)
    q, k, v = _np_qkv()
    kv = np.array([[True] * 6 + [False] * 2])
    want = attn(*(jnp.asarray(x) for x in (q, k, v)), mask=ea.Mask(kv_mask=jnp.asarray(kv)))
    np.testing.assert_allclose(attn(q, k, v, mask=ea.Mask(kv_mask=kv)), want, rtol=1e-6)
    np.testing.assert_allclose(attn(q, k, v, mask=ea.Mask(kv_mask=kv.tolist())), want, rtol=1e-6)


def test_integer_mask_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"Mask.kv_mask must be bool.*astype\(bool\)"):
        ea.build("full", num_heads=2, head_dim=4, max_len=16)(*_np_qkv(), mask=ea.Mask(kv_mask=np.ones((1, 8), np.int32)))


def test_an_empty_axis_is_named_not_rebuilt():
    q = np.zeros((1, 8, 2, 0), np.float32)
    with pytest.raises(ValueError, match=r"q has an empty axis, shape \[1, 8, 2, 0\]") as err:
        ea.build("full", num_heads=2, head_dim=4, max_len=16)(q, q, q)
    assert "head_dim=0" not in str(err.value)


def test_attention_fn_for_a_learned_variant_names_the_right_argument():
    from flax import nnx

    fn = ea.attention_fn("linformer")
    q = jnp.ones((1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"MultiHeadAttention\(num_heads, in_features, attention='linformer'"):
        fn(q, q, q)
    del nnx


def test_gqa_sizes_are_checked():
    with pytest.raises(ValueError, match=r"num_heads=8 is not divisible by num_kv_heads=3; choose num_kv_heads among \[1, 2, 4, 8\]"):
        ea.Dims(8, 4, 16, num_kv_heads=3)
    assert ea.Dims(8, 4, 16, num_kv_heads=2).group_size == 4 and ea.Dims(8, 4, 16).num_kv_heads == 8
    attn = ea.build("full", num_heads=2, head_dim=4, max_len=16)
    q, k, v = _np_qkv()
    with pytest.raises(ValueError, match="k and v head counts differ"):
        attn(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match="rebuild with num_kv_heads=1"):
        attn(q, k[:, :, :1], v[:, :, :1])


def test_segments_need_the_capability_and_integer_ids():
    q, k, v = _np_qkv()
    ids = np.zeros((1, 8), np.int32)
    full = ea.build("full", num_heads=2, head_dim=4, max_len=16)
    if not ea.get_spec("full").capabilities.segments:
        with pytest.raises(ea.CapabilityError, match="packed sequences"):
            full(q, k, v, mask=ea.Mask(q_segment_ids=ids, kv_segment_ids=ids))
    able = [n for n in ea.list_variants() if ea.get_spec(n).capabilities.segments]
    if not able:
        pytest.skip("no variant has segments yet")
    attn = ea.build(able[0], num_heads=2, head_dim=4, max_len=16)
    with pytest.raises(ValueError, match="kv_segment_ids is missing"):
        attn(q, k, v, mask=ea.Mask(q_segment_ids=ids))
    with pytest.raises(TypeError, match=r"q_segment_ids must be integers.*astype\(jnp.int32\)"):
        attn(q, k, v, mask=ea.Mask(q_segment_ids=ids.astype(np.float32), kv_segment_ids=ids))
    with pytest.raises(ValueError, match=r"kv_segment_ids must have shape \[1, 8\]"):
        attn(q, k, v, mask=ea.Mask(q_segment_ids=ids, kv_segment_ids=ids[:, :4]))


def test_options_a_variant_lacks_are_capability_errors():
    with pytest.raises(ea.CapabilityError, match=r"'linear' cannot do the 'softcap' option"):
        ea.build("linear", num_heads=2, head_dim=4, max_len=16, softcap=30.0)
    with pytest.raises(ea.CapabilityError, match="grouped-query attention"):
        ea.build("synthesizer", num_heads=2, head_dim=4, max_len=16, num_kv_heads=1)
