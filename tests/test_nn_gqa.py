"""Grouped-query attention through the layers: ``nn.MultiHeadAttention``, the models, the flax adapter.

- MultiHeadAttention(num_kv_heads=G): the k/v projections have H / G times fewer parameters,
  and the layer is the same function as the H-head layer whose k/v projection weights are
  those G heads repeated per query head (query head h reads kv head h // (H / G)).
- The causal LM with num_kv_heads 1 and 2 (linear core): runs, one SGD step lowers the loss on
  its batch; greedy ``generate`` (2 kv heads) equals the forward's argmax; the LRA encoder with
  num_kv_heads=1 runs.
- flax.nnx.MultiHeadAttention(num_kv_heads=G) with ``ea.attention_fn``: an exact variant equals
  flax's own attention; linear equals the variant built with num_kv_heads=G on flax's projections;
  a variant without gqa refuses with CapabilityError.
- Bad num_kv_heads (not dividing num_heads, not positive, a core without gqa) are refused clearly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from conftest import assert_close
from efficient_attn import nn

H, F, T = 4, 16, 12
NO_GQA = next(n for n in ea.list_variants() if not ea.get_spec(n).capabilities.gqa and ea.get_spec(n).capabilities.causal)


def _kv_params(layer) -> int:
    return sum(int(np.prod(x.shape)) for m in (layer.key, layer.value) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


def _both_masks(layer):
    """The layer's outputs without and with a causal mask, as one jitted function of x."""
    graphdef, state = nnx.split(layer)

    def run(x):
        m = nnx.merge(graphdef, state, copy=True)
        return m(x, mask=ea.Mask()), m(x, mask=ea.Mask(causal=True))

    return jax.jit(run)


@pytest.mark.parametrize("attention,G", [("full", 2), ("linear", 1)])
def test_mha_gqa_is_mha_with_repeated_kv_projections(attention, G):
    x = jax.random.normal(jax.random.key(0), (2, T, F))
    mha = nn.MultiHeadAttention(H, F, max_len=T, attention=attention, rngs=nnx.Rngs(0))
    gqa = nn.MultiHeadAttention(H, F, max_len=T, attention=attention, num_kv_heads=G, rngs=nnx.Rngs(0))
    assert gqa.core.dims.num_kv_heads == G
    assert _kv_params(mha) == _kv_params(gqa) * (H // G)
    rep = mha
    rep.query, rep.out = gqa.query, gqa.out
    for name in ("key", "value"):  # W [F, G, D] -> [F, H, D], bias [G, D] -> [H, D]: head h = kv head h // (H/G)
        src, dst = getattr(gqa, name), getattr(rep, name)
        dst.kernel[...] = jnp.repeat(src.kernel[...], H // G, axis=1)
        dst.bias[...] = jnp.repeat(src.bias[...], H // G, axis=0)
    for label, a, b in zip(("bidirectional", "causal"), _both_masks(gqa)(x), _both_masks(rep)(x)):
        assert_close(f"{attention} G={G} {label}", a, b, rtol=1e-4, atol=1e-5)


def _lm(num_kv_heads: int, attention: str = "linear"):
    cfg = nn.LMConfig(vocab_size=11, max_len=T, num_layers=1, emb_dim=F, num_heads=H, mlp_dim=32,
                      attention=attention, num_kv_heads=num_kv_heads)
    return nn.CausalLM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_lm_with_gqa_trains_a_step(num_kv_heads):
    lm = _lm(num_kv_heads)
    assert lm.trunk.blocks[0].attn.key.kernel.shape == (F, num_kv_heads, F // H)
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, 11)
    graphdef, params, rest = nnx.split(lm, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest, copy=True)(tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    before, grads = value_and_grad(params)
    g_key = grads["trunk"]["blocks"][0]["attn"]["key"]["kernel"][...]
    assert g_key.shape == (F, num_kv_heads, F // H) and bool(jnp.all(jnp.isfinite(g_key))) and float(jnp.abs(g_key).max()) > 0
    stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    after, _ = value_and_grad(stepped)
    assert np.isfinite(float(before)) and float(after) < float(before), (float(before), float(after))


def test_lm_with_gqa_generates_the_forwards_argmax():
    """The decoding state holds 2 kv heads; being causal, the forward's logits at position i - 1
    of the generated sequence are those the i-th token was chosen from."""
    lm = _lm(2)
    out = lm.generate(jax.random.randint(jax.random.key(3), (2, 4), 0, 11), 4)
    logits = nnx.jit(lambda m, t: m(t))(lm, out)
    np.testing.assert_array_equal(np.asarray(out[:, 4:]), np.asarray(jnp.argmax(logits[:, 3:-1], -1)))


def test_encoder_with_one_kv_head_runs():
    cfg = nn.EncoderConfig(vocab_size=11, max_len=T, num_classes=3, num_layers=1, emb_dim=F, num_heads=H, mlp_dim=32,
                           attention="linear", num_kv_heads=1)
    model = nn.Classifier(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, T), jnp.int32)
    logits = nnx.jit(lambda m, t, k: m(t, k))(model, tokens, jnp.ones((2, T), bool).at[1, 6:].set(False))
    assert logits.shape == (2, 3) and bool(jnp.all(jnp.isfinite(logits)))
    assert model.trunk.blocks[0].attn.core.dims.num_kv_heads == 1


def test_flax_multihead_attention_passes_gqa_through():
    x = jax.random.normal(jax.random.key(2), (2, T, F))

    def flax_mha(attention_fn=None):
        kw = {} if attention_fn is None else {"attention_fn": attention_fn}
        return nnx.MultiHeadAttention(num_heads=H, in_features=F, num_kv_heads=2, decode=False, rngs=nnx.Rngs(0), **kw)

    default = flax_mha()
    exact = flax_mha(ea.attention_fn("blockwise"))
    assert_close("blockwise == flax attention", exact(x), default(x), rtol=1e-4, atol=1e-5)

    linear = flax_mha(ea.attention_fn("linear"))
    q, k, v = linear.query(x), linear.key(x), linear.value(x)
    assert k.shape == (2, T, 2, F // H)  # flax hands over the 2 kv heads
    core = ea.build("linear", num_heads=H, head_dim=F // H, max_len=T, num_kv_heads=2)
    assert_close("linear through flax", linear(x), linear.out(core(q, k, v)), rtol=1e-5, atol=1e-6)

    with pytest.raises(ea.CapabilityError, match="gqa"):
        flax_mha(ea.attention_fn(NO_GQA))(x)


def test_bad_num_kv_heads_refused():
    with pytest.raises(ValueError, match=r"num_kv_heads=3 must divide num_heads=4.*\[1, 2, 4\]"):
        nn.MultiHeadAttention(H, F, max_len=T, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads must be an int >= 1"):
        nn.MultiHeadAttention(H, F, max_len=T, num_kv_heads=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        nn.LMConfig(vocab_size=11, max_len=T, num_heads=H, emb_dim=F, num_kv_heads=3)
    with pytest.raises(ea.CapabilityError, match="gqa"):
        nn.LMConfig(vocab_size=11, max_len=T, num_heads=H, emb_dim=F, attention=NO_GQA, num_kv_heads=2)
    with pytest.raises(ea.CapabilityError, match="gqa"):
        nn.MultiHeadAttention(H, F, max_len=T, attention=NO_GQA, num_kv_heads=2, rngs=nnx.Rngs(0))
    assert nn.LMConfig(vocab_size=11, max_len=T, num_heads=H, emb_dim=F).num_kv_heads == H  # the default
