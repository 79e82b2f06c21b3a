"""Packed sequences, soft cap and sinks over every registered variant: honoured or refused.

- ``segments``: a variant that claims it gives, on two rows each packing three sequences
  (with a key-padding hole), the same outputs and gradients (dq, dk, dv by name, and the
  gradient of every parameter, summed over the sequences) as each sequence run alone. It
  runs at its declared exact-limit setting when it has one (a fixed pattern such as
  BigBird's blocks is a pattern of the packed row's positions, so only a pattern that
  covers every segment is position-free) and at its defaults otherwise; with its soft cap
  and random sink logits on when it claims them, and grouped kv heads when it claims gqa.
  A variant that does not claim it refuses segment ids with a CapabilityError.
- ``softcap`` / ``sinks``: a variant that claims them has the option in its config, a
  learned ``sinks`` parameter of one logit per head, and equals the dense reference
  (``softmax_attention`` with the cap, the sinks and the same masks) at its exact-limit
  setting, output and dq, dk, dv, d_sinks by name: on the packed batch above when it also
  claims segments (one compiled program serves both checks), else on one unpacked batch.
  A variant that does not claim them refuses to build with them (CapabilityError, or its
  config's own error).

Each variant runs one mode: causal where it can (packed language-model training), else
bidirectional; tests/ops/test_softmax_options.py covers both modes for the softmax family.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from conftest import assert_close
from conformance import harness
from conformance.harness import caps
from efficient_attn.ops.reference.softmax import softmax_attention

H, D = 4, 16
SEQ, PER_ROW = 10, 3  # three sequences of 10 per row: boundaries at 10 and 20, off the usual grids
T = SEQ * PER_ROW
CAP = 3.0
SINKS = jnp.asarray([0.5, -1.0, 1.5, 0.0])
GRAD_TOL = dict(rtol=1e-3, atol=1e-4)


def _setting(variant: str) -> dict:
    limit = ea.get_spec(variant).exact_limit
    return dict(limit(T)) if limit is not None else {}


def _module(variant: str):
    """The variant at its exact-limit setting (or defaults), with every option it claims on."""
    c = caps(variant)
    options = {**_setting(variant)}
    if c.softcap:
        options["softcap"] = CAP
    if c.sinks:
        options["sinks"] = True
    module = ea.build(variant, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(0),
                      num_kv_heads=H // 2 if c.gqa else H, **options)
    if c.sinks:
        module.sinks.value = SINKS
    return module


def _causal(variant: str) -> bool:
    """Causal where the variant can (packed language-model training), else bidirectional."""
    return caps(variant).causal


def _value_and_grads(module, mask):
    """jit of (q, k, v, w) -> (out, (d params, dq, dk, dv)) of sum(out * w)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, q, k, v, w):
        out = nnx.merge(graphdef, params, rest, copy=True)(q, k, v, mask=mask)
        return jnp.sum(out * w), out

    grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    return jax.jit(lambda q, k, v, w: grad(params, q, k, v, w)[::-1])


def _inputs(batch: int, length: int, hkv: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(keys[0], (batch, length, H, D)), jax.random.normal(keys[1], (batch, length, hkv, D)),
            jax.random.normal(keys[2], (batch, length, hkv, D)), jax.random.normal(keys[3], (batch, length, H, D)))


def _unpack(x):
    """[2, T, ...] packed rows -> [2 * PER_ROW, SEQ, ...] sequences (row-major)."""
    return x.reshape((x.shape[0] * PER_ROW, SEQ) + x.shape[2:])


def _ids():
    return jnp.asarray(np.repeat(np.arange(PER_ROW), SEQ)[None].repeat(2, 0), jnp.int32)


def test_packed_equals_each_sequence_alone(variant):
    c = caps(variant)
    if not c.segments:
        pytest.skip(f"{variant} does not claim segments (its refusal is checked below)")
    module = _module(variant)
    causal = _causal(variant)
    q, k, v, w = _inputs(2, T, module.dims.num_kv_heads, seed=2)
    kv = _kv_mask() if c.kv_mask else None
    packed = ea.Mask(causal=causal, kv_mask=kv, q_segment_ids=_ids(), kv_segment_ids=_ids())
    out, grads = _value_and_grads(module, packed)(q, k, v, w)
    alone = ea.Mask(causal=causal, kv_mask=None if kv is None else _unpack(kv))
    alone_out, alone_grads = _value_and_grads(module, alone)(*map(_unpack, (q, k, v, w)))
    where = f"{variant} at {_setting(variant) or 'its defaults'}"
    if c.softcap or c.sinks:
        _check_against_reference(variant, module, causal, True, out, grads)
    assert_close(f"{where}: out", _unpack(out), alone_out, rtol=2e-4, atol=2e-5)
    for name, g, want in zip(("dq", "dk", "dv"), grads[1:], alone_grads[1:]):
        assert_close(f"{where}: {name}", _unpack(g), want, **GRAD_TOL)
    flat = lambda state: dict(jax.tree_util.tree_leaves_with_path(state))  # noqa: E731
    got_p, want_p = flat(grads[0]), flat(alone_grads[0])  # both summed over the same six sequences
    assert got_p.keys() == want_p.keys()
    for path, g in got_p.items():
        assert_close(f"{where}: d{jax.tree_util.keystr(path)}", g, want_p[path], **GRAD_TOL)


def test_segments_refused_without_capability(variant):
    if caps(variant).segments:
        pytest.skip(f"{variant} claims segments")
    module = harness.built(variant)  # the suite's shared module: the refusal comes before any compute
    q, k, v = harness.qkv(8)
    ids = jnp.zeros((harness.B, 8), jnp.int32)
    with pytest.raises(ea.CapabilityError, match="segments"):
        module(q, k, v, mask=ea.Mask(causal=not caps(variant).bidirectional, q_segment_ids=ids, kv_segment_ids=ids))


@functools.lru_cache(maxsize=None)
def _reference(causal: bool, hkv: int, softcap, use_sinks: bool, packed: bool):
    """The dense reference's output and (dq, dk, dv, d_sinks), shared by every variant."""
    q, k, v, w = _inputs(2, T, hkv, seed=2)
    ids = _ids() if packed else None
    mask = ea.Mask(causal=causal, kv_mask=_kv_mask(), q_segment_ids=ids, kv_segment_ids=ids)

    def loss(q, k, v, s):
        out = softmax_attention(q, k, v, mask, softcap=softcap, sinks=s if use_sinks else None)
        return jnp.sum(out * w), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, SINKS)
    return out, grads


def _kv_mask():
    return jnp.ones((2, T), bool).at[0, 3].set(False).at[1, 17:19].set(False)


@pytest.mark.parametrize("option", ["softcap", "sinks"])
def test_claimed_option_is_in_the_config(variant, option):
    claims = getattr(caps(variant), option)
    has_field = option in ea.get_spec(variant).defaults()
    if claims:
        assert has_field, f"{variant} claims {option} but its config has no {option!r} field"
    else:
        with pytest.raises((ea.CapabilityError, ValueError, TypeError)):
            ea.build(variant, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(0),
                     **{option: CAP if option == "softcap" else True})


def test_softcap_and_sinks_equal_the_reference(variant):
    c = caps(variant)
    if not (c.softcap or c.sinks):
        pytest.skip(f"{variant} claims neither softcap nor sinks (refusal checked above)")
    if c.segments and c.kv_mask:
        pytest.skip(f"{variant}: checked against the reference on the packed batch (test_packed_equals_each_sequence_alone)")
    module = _module(variant)
    causal = _causal(variant)
    q, k, v, w = _inputs(2, T, module.dims.num_kv_heads, seed=2)
    out, grads = _value_and_grads(module, ea.Mask(causal=causal, kv_mask=_kv_mask()))(q, k, v, w)
    _check_against_reference(variant, module, causal, False, out, grads)


def _check_against_reference(variant, module, causal: bool, packed: bool, out, grads):
    """out and (d params, dq, dk, dv) of ``_inputs(seed=2)`` against the dense reference."""
    c = caps(variant)
    assert c.exact or ea.get_spec(variant).exact_limit is not None, (
        f"{variant} claims softcap/sinks but is neither exact nor declares an exact limit to check them at"
    )
    if c.sinks:
        assert isinstance(getattr(module, "sinks", None), nnx.Param) and module.sinks.value.shape == (H,), (
            f"{variant}: sinks=True must give a learned `sinks` parameter of shape [{H}]"
        )
    want, want_grads = _reference(causal, module.dims.num_kv_heads, CAP if c.softcap else None, c.sinks, packed)
    where = f"{variant} at {_setting(variant) or 'its defaults'} against the reference"
    assert_close(f"{where}: out", out, want, rtol=2e-4, atol=2e-5)
    for name, g, r in zip(("dq", "dk", "dv"), grads[1:], want_grads[:3]):
        assert_close(f"{where}: {name}", g, r, **GRAD_TOL)
    if c.sinks:
        assert_close(f"{where}: d_sinks", grads[0]["sinks"].value, want_grads[3], **GRAD_TOL)
