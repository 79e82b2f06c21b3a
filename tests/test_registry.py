"""The variant contract as a plugin author meets it: registration, build, the base class's call,
plugin loading, and the declarations experiments read."""

from __future__ import annotations

import dataclasses
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn import registry


@dataclasses.dataclass(frozen=True)
class _NoConfig:
    pass


@pytest.fixture
def scratch_names():
    """Names registered by a test are removed after it."""
    names: list[str] = []
    yield names
    for n in names:
        registry.unregister(n)


def _qkv(B=1, T=8, H=2, D=4):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, H, D)), jnp.float32)
    return x, x + 1.0, x * 2.0


def test_plugin_without_super_init_works_through_build(scratch_names):
    @ea.register("_mean_pool", config=_NoConfig)
    class MeanPool(ea.Attention):
        """Mean of the values (a plugin whose __init__ skips super().__init__)."""

        capabilities = ea.Capabilities(cross=True, time="O(N)", memory="O(N)")

        def __init__(self, config, dims, *, rngs):
            self.scale = 1.0

        def attend(self, q, k, v, mask):
            return jnp.broadcast_to(v.mean(axis=1, keepdims=True), q.shape[:3] + v.shape[3:]) * self.scale

    scratch_names.append("_mean_pool")
    attn = ea.build("_mean_pool", num_heads=2, head_dim=4, max_len=16)
    assert attn.dims == ea.Dims(2, 4, 16) and attn.config == _NoConfig()
    q, k, v = _qkv()
    np.testing.assert_allclose(attn(q, k, v), jnp.broadcast_to(v.mean(1, keepdims=True), v.shape))
    # built directly, bypassing build(), the call names the fix
    direct = MeanPool(_NoConfig(), ea.Dims(2, 4, 16), rngs=nnx.Rngs(0))
    with pytest.raises(AttributeError, match=r"did not call super\(\).__init__.*ea.build"):
        direct(q, k, v)


def test_attend_never_sees_mask_none(scratch_names):
    seen = []

    @ea.register("_spy", config=_NoConfig)
    class Spy(ea.Attention):
        """Records the mask it is given."""

        capabilities = ea.Capabilities(causal=True, kv_mask=True)

        def attend(self, q, k, v, mask):
            seen.append(mask)
            return v

    scratch_names.append("_spy")
    attn = ea.build("_spy", num_heads=2, head_dim=4, max_len=16)
    q, k, v = _qkv()
    attn(q, k, v)
    attn(q, k, v, mask=ea.Mask(kv_mask=[[True] * 8]))  # a list becomes a bool array
    assert isinstance(seen[0], ea.Mask) and seen[0].causal is False and seen[0].kv_mask is None
    assert seen[1].kv_mask.dtype == jnp.bool_ and seen[1].kv_mask.shape == (1, 8)


@pytest.mark.parametrize("returned, word", [(None, "None"), ((1, 2), "tuple")])
def test_a_variant_returning_no_array_is_named(scratch_names, returned, word):
    @ea.register("_returns_junk", config=_NoConfig)
    class Junk(ea.Attention):
        """Returns something that is not an array."""

        def attend(self, q, k, v, mask):
            return returned

    scratch_names.append("_returns_junk")
    with pytest.raises(TypeError, match=rf"_returns_junk: attend\(\) returned {word}, expected an array \[B, T, H, Dv\]"):
        ea.build("_returns_junk", num_heads=2, head_dim=4, max_len=16)(*_qkv())


def test_a_class_implementing_nothing_is_refused_at_registration():
    with pytest.raises(TypeError, match=r"implements neither attend.*define attend\(self, q, k, v, mask\)"):
        @ea.register("_empty", config=_NoConfig)
        class Empty(ea.Attention):
            """Nothing."""


def test_attend_and_call_together_are_refused():
    with pytest.raises(TypeError, match="defines both attend"):
        class Both(ea.Attention):
            def attend(self, q, k, v, mask):
                return v

            def __call__(self, q, k, v, *, mask=None):
                return v


def test_declarations_are_checked_against_the_config():
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        window: int = 4

    class Band(ea.Attention):
        def attend(self, q, k, v, mask):
            return v

    with pytest.raises(ValueError, match=r"budget knob 'rank' is not a field of Cfg \(window\)"):
        ea.register("_bad_budget", config=Cfg, budget=ea.Budget("rank", (1, 2)))(Band)
    with pytest.raises(ValueError, match="pattern_setting names"):
        ea.register("_bad_pattern", config=Cfg, pattern_setting={"rank": 2})(Band)
    assert "_bad_budget" not in ea.list_variants() and "_bad_pattern" not in ea.list_variants()


def test_learned_is_derived_from_parameters():
    assert registry.has_parameters("linformer") and registry.has_parameters("sinkhorn")
    assert not registry.has_parameters("full") and not registry.has_parameters("performer")


def test_the_exact_reference_and_its_twin_come_from_the_registry():
    ref = registry.exact_reference()
    assert ea.get_spec(ref).capabilities.exact and ea.get_spec(ref).fast_exact in ea.list_variants()


def test_build_names_a_wrong_rngs():
    with pytest.raises(TypeError, match=r"rngs must be a flax.nnx.Rngs, got int 42; pass rngs=nnx.Rngs\(42\)"):
        ea.build("full", num_heads=2, head_dim=4, max_len=16, rngs=42)


def test_numpy_integers_are_sizes_and_hyperparameters():
    attn = ea.build("local", num_heads=np.int64(2), head_dim=np.int64(4), max_len=16, window=np.int64(3))
    assert attn.dims.num_heads == 2 and type(attn.dims.num_heads) is int


@pytest.mark.parametrize("name, hp", [("blockwise", {"block_size": np.int64(8)}), ("gla", {"chunk_size": np.int64(8)}),
                                      ("deltanet", {"chunk_size": np.int32(8)})])
def test_numpy_integer_hyperparameters_reach_the_engines(name, hp):
    """A numpy integer block or chunk size is a Python int in the config and the call works."""
    attn = ea.build(name, num_heads=2, head_dim=4, max_len=32, **hp)
    (field, value), = hp.items()
    assert type(getattr(attn.config, field)) is int and getattr(attn.config, field) == int(value)
    q = np.ones((1, 20, 2, 4), np.float32)
    out = attn(q, q, q, mask=ea.Mask(causal=True))
    assert out.shape == (1, 20, 2, 4) and np.isfinite(np.asarray(out)).all()


def test_public_helpers():
    assert issubclass(ea.CapabilityError, ValueError)
    with pytest.raises(ValueError, match="mine: bad hyperparameter: x must be an int >= 1"):
        ea.check_positive_int("mine", "x", 0)
    with pytest.raises(ValueError, match="mine: bad hyperparameter: nope"):
        ea.check_config("mine", False, "nope")


def test_a_failed_plugin_import_leaves_nothing_behind(tmp_path):
    path = tmp_path / "half_written.py"
    body = textwrap.dedent('''
        import dataclasses
        import efficient_attn as ea

        @dataclasses.dataclass(frozen=True)
        class Cfg:
            pass

        @ea.register("_half_written", config=Cfg)
        class HalfWritten(ea.Attention):
            """A plugin being written."""

            def attend(self, q, k, v, mask):
                return v
        ''')
    path.write_text(body + "raise RuntimeError('not finished')\n")
    with pytest.raises(RuntimeError, match="not finished"):
        registry.load_plugin(path)
    assert "_half_written" not in ea.list_variants()
    path.write_text(body)
    try:
        registry.load_plugin(path)
        assert "_half_written" in ea.list_variants()
        assert ea.get_spec("_half_written").family == "plugin"
    finally:
        registry.unregister("_half_written")
