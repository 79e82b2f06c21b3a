"""The public API: registry behaviour, input validation, the Flax adapter, the CLI."""

import dataclasses
import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from conftest import make_qkv
from efficient_attn import cli, registry


def _qkv(B=1):
    """q, k, v [B, 8, 2, 4] from the shared helper (the shapes every test here uses)."""
    return make_qkv(8, B=B, H=2, D=4)


def test_public_names():
    assert set(ea.__all__) == {"Attention", "Mask", "Capabilities", "Dims", "register", "build", "get_spec",
                               "list_variants", "attention_fn", "Budget", "CapabilityError", "check_config",
                               "check_positive_int"}


def test_spec_fields():
    spec = ea.get_spec("blockwise")
    assert spec.name == "blockwise"
    assert spec.capabilities.exact and spec.capabilities.memory == "O(N)"
    assert spec.defaults() == {"block_size": 1024, "backward_query_block": 256, "softcap": None, "sinks": False}
    assert spec.citation and spec.summary
    assert "full" in ea.list_variants() and ea.list_variants() == sorted(ea.list_variants())


def test_unknown_variant_suggests_close_names():
    with pytest.raises(KeyError, match="did you mean 'blockwise'"):
        ea.get_spec("blokwise")


def test_unknown_hyperparameter_lists_valid_ones():
    with pytest.raises(TypeError, match=r"block_size=1024"):
        ea.build("blockwise", num_heads=2, head_dim=4, max_len=8, block_sise=64)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_hyperparameter_value(bad):
    with pytest.raises(ValueError, match="block_size"):
        ea.build("blockwise", num_heads=2, head_dim=4, max_len=8, block_size=bad)


def test_bad_dims():
    with pytest.raises(ValueError, match="num_heads"):
        ea.build("full", num_heads=0, head_dim=4, max_len=8)


def test_duplicate_registration_is_an_error():
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        pass

    with pytest.raises(ValueError, match="already registered"):
        @ea.register("full", config=Cfg)
        class Again(ea.Attention):
            pass


def test_register_requires_attention_subclass():
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        pass

    with pytest.raises(TypeError, match="subclass"):
        ea.register("not_attention", config=Cfg)(object)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda q, k, v: (q[0], k, v), "rank 4"),
        (lambda q, k, v: (q, k[:, :, :1], v), "head counts"),
        (lambda q, k, v: (q, k, v[:, :5]), "lengths differ"),
        (lambda q, k, v: (q, k[..., :3], v), "head widths"),
        (lambda q, k, v: (q.astype(jnp.int32), k, v), "floating"),
        (lambda q, k, v: (q, k.astype(jnp.bfloat16), v), "one dtype"),
    ],
)
def test_bad_inputs_are_named(make, match):
    attn = ea.build("full", num_heads=2, head_dim=4, max_len=16)
    with pytest.raises((ValueError, TypeError), match=match):
        attn(*make(*_qkv()))


def test_batch_mismatch():
    attn = ea.build("full", num_heads=2, head_dim=4, max_len=16)
    q, k, v = _qkv(B=2)
    with pytest.raises(ValueError, match="batch"):
        attn(q, k[:1], v[:1])


def test_sequence_longer_than_max_len():
    attn = ea.build("full", num_heads=2, head_dim=4, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        attn(*_qkv())


def test_wrong_mask_shapes_and_dtypes():
    attn = ea.build("full", num_heads=2, head_dim=4, max_len=16)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"kv_mask must have shape \[1, 8\]"):
        attn(q, k, v, mask=ea.Mask(kv_mask=jnp.ones((1, 7), bool)))
    with pytest.raises(TypeError, match="bool"):
        attn(q, k, v, mask=ea.Mask(kv_mask=jnp.ones((1, 8), jnp.int32)))
    with pytest.raises(ValueError, match="q_mask"):
        attn(q, k, v, mask=ea.Mask(q_mask=jnp.ones((2, 8), bool)))
    with pytest.raises(ValueError, match="Mask.dense"):
        attn(q, k, v, mask=ea.Mask(dense=jnp.ones((1, 2, 8, 9), bool)))


def test_capability_error_names_able_variants():
    with pytest.raises(ValueError, match=r"plugin_softmax.*causal.*variants that can: .*blockwise"):
        from conformance import harness  # noqa: F401  (registers the test plugin)

        ea.build("plugin_softmax", num_heads=2, head_dim=4, max_len=16)(*_qkv(), mask=ea.Mask(causal=True))


def test_dense_mask_on_full():
    attn = ea.build("full", num_heads=2, head_dim=4, max_len=16)
    q, k, v = _qkv()
    tri = jnp.tril(jnp.ones((8, 8), bool))[None, None]
    np.testing.assert_allclose(attn(q, k, v, mask=ea.Mask(dense=tri)), attn(q, k, v, mask=ea.Mask(causal=True)),
                               rtol=1e-6)


def test_attention_fn_in_flax_multihead_attention():
    x = jax.random.normal(jax.random.key(1), (2, 12, 16))
    kw = dict(num_heads=2, in_features=16, qkv_features=16, decode=False)
    ref = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
    ours = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0), attention_fn=ea.attention_fn("blockwise", block_size=4))
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    pad = jnp.arange(12)[None, :] < jnp.array([[12], [7]])
    mask = nnx.make_attention_mask(jnp.ones((2, 12), bool), pad)  # [B, 1, T, S]: dense
    kvmask = pad[:, None, None, :]  # [B, 1, 1, S]: becomes Mask.kv_mask
    np.testing.assert_allclose(ours(x, mask=kvmask), ref(x, mask=mask), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dense"):
        ours(x, mask=mask)  # blockwise cannot honour an arbitrary dense mask: refused, not ignored


def test_attention_fn_rejects_unknown_hyperparameters():
    with pytest.raises(TypeError, match="valid"):
        ea.attention_fn("blockwise", window=3)


def test_entry_point_plugins(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="ep_demo", value="tests_ep_plugin", group=registry.ENTRY_POINT_GROUP)
    import sys
    import types

    mod = types.ModuleType("tests_ep_plugin")

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        pass

    def _register():
        @ea.register("ep_demo", config=Cfg)
        class EpDemo(ea.Attention):
            """Entry-point demo."""

            def __call__(self, q, k, v, *, mask=None):
                return v

    exec_count = []
    mod.__dict__["register"] = lambda: (exec_count.append(1), _register())
    monkeypatch.setitem(sys.modules, "tests_ep_plugin", mod)
    ep = importlib.metadata.EntryPoint(name="ep_demo", value="tests_ep_plugin:register", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry.importlib.metadata, "entry_points", lambda group=None: [ep])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert "ep_demo" in ea.list_variants()
        assert exec_count == [1]
    finally:
        registry.unregister("ep_demo")


def test_cli_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == cli.REGISTRY_HEADERS
    for name in ea.list_variants():
        assert any(line.split()[0] == name for line in out.splitlines()[2:])
