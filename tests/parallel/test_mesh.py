"""Mesh specs and the refusals of bad requests (efficient_attn/parallel/mesh.py and the checks
of ring.py / context_linear.py), all in this one-device process: a mesh of 4 or 8 devices is
an ``AbstractMesh`` here (the checks run before anything would execute)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

import efficient_attn as ea
from efficient_attn.parallel import (
    axis_size,
    context_gated_linear_attention,
    context_linear_attention,
    format_mesh,
    make_mesh,
    parse_mesh,
    ring_attention,
)
from efficient_attn.parallel.ring import RingAttention, RingConfig


def test_parse_keeps_the_order_and_round_trips():
    assert list(parse_mesh("data=2, seq=4").items()) == [("data", 2), ("seq", 4)]
    assert list(parse_mesh("seq=4,data=2")) == ["seq", "data"]
    assert format_mesh(parse_mesh("data=2,seq=4")) == "data=2,seq=4"


@pytest.mark.parametrize("spec, message", [
    ("", "is empty"),
    ("data", "is not axis=size"),
    ("data=0", "must be a positive integer, got '0'"),
    ("data=two", "must be a positive integer, got 'two'"),
    ("2d=2", "is not an identifier"),
    ("seq=2,seq=4", "axis 'seq' is named twice"),
])
def test_bad_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh(spec)


def test_a_mesh_larger_than_the_devices_names_the_fix():
    with pytest.raises(ValueError, match=r"needs 8 devices, got 1: on a CPU, simulate 8 devices by setting "
                                         r"XLA_FLAGS=--xla_force_host_platform_device_count=8"):
        make_mesh("data=2,seq=4")
    mesh = make_mesh("seq=1")
    assert dict(mesh.shape) == {"seq": 1}


def test_an_axis_the_mesh_lacks_is_refused_with_the_axes_it_has():
    with pytest.raises(ValueError, match=r"mesh axis 'seq' does not exist; this mesh has axes data=2,model=4"):
        axis_size(AbstractMesh((2, 4), ("data", "model")), "seq")
    with pytest.raises(TypeError, match="must be a jax.sharding.Mesh"):
        axis_size({"seq": 4}, "seq")


def _qkv(B, T, H=2, D=4):
    x = jnp.zeros((B, T, H, D))
    return x, x, x


def test_ring_refuses_a_length_the_axis_does_not_divide():
    mesh = AbstractMesh((4,), ("seq",))
    with pytest.raises(ValueError, match=r"the query length T = 30 is not divisible by 4 .*pad the sequence to 32"):
        ring_attention(*_qkv(2, 30), mesh=mesh)
    # causal zigzag: two chunks per device
    with pytest.raises(ValueError, match=r"T = 36 is not divisible by 8 \(2 chunks on each of 4 devices.*pad the "
                                         r"sequence to 40"):
        ring_attention(*_qkv(2, 36), mesh=mesh, causal=True)
    with pytest.raises(ValueError, match=r"mesh axis 'sequence' does not exist"):
        ring_attention(*_qkv(2, 32), mesh=mesh, axis="sequence")


def test_a_batch_the_data_axis_does_not_divide_is_refused():
    mesh = AbstractMesh((2, 4), ("data", "seq"))
    with pytest.raises(ValueError, match=r"the batch size B = 3 is not divisible by 2"):
        ring_attention(*_qkv(3, 32), mesh=mesh, batch_axis="data")
    with pytest.raises(ValueError, match="batch_axis and axis are both 'seq'"):
        ring_attention(*_qkv(2, 32), mesh=mesh, batch_axis="seq")


def test_context_parallel_engines_refuse_indivisible_lengths():
    mesh = AbstractMesh((4,), ("seq",))
    q, k, v = _qkv(1, 18)
    with pytest.raises(ValueError, match=r"context_linear_attention: the query length T = 18 is not divisible by 4"):
        context_linear_attention(q, k, v, mesh=mesh, causal=True)
    with pytest.raises(ValueError, match=r"context_gated_linear_attention: the sequence length T = 18 is not "
                                         r"divisible by 4"):
        context_gated_linear_attention(q, k, v, jnp.zeros((1, 18, 2)), mesh=mesh)


def test_the_ring_core_refuses_what_it_cannot_do():
    core = RingAttention(RingConfig(), ea.Dims(num_heads=2, head_dim=4, max_len=16), mesh=make_mesh("seq=1"))
    q, k, v = _qkv(1, 8)
    with pytest.raises(ea.CapabilityError):
        core(q, k, v, mask=ea.Mask(dense=jnp.ones((1, 1, 8, 8), bool)))
    out = core(q, k + 1.0, v + np.arange(8.0)[None, :, None, None], mask=ea.Mask(causal=True))
    assert out.shape == (1, 8, 2, 4) and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="mesh axis 'seq' does not exist"):
        RingAttention(RingConfig(), ea.Dims(num_heads=2, head_dim=4, max_len=16), mesh=make_mesh("data=1"))
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        RingConfig(block_size=0)
    assert isinstance(nnx.state(core), nnx.State)  # a module like any core
