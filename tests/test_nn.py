"""Models in efficient_attn.nn: projections around a core, the LRA encoder, the causal LM."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn.nn import CausalLM, Classifier, EncoderConfig, LMConfig, MultiHeadAttention


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def test_mha_shapes_and_cross():
    mha = MultiHeadAttention(4, 16, max_len=32, qkv_features=24, out_features=12, rngs=nnx.Rngs(0))
    x, c = _rand(0, (2, 7, 16)), _rand(1, (2, 11, 16))
    q, k, v = mha.qkv(x, c)
    assert q.shape == (2, 7, 4, 6) and k.shape == (2, 11, 4, 6) and v.shape == (2, 11, 4, 6)
    assert mha(x).shape == (2, 7, 12)
    assert mha(x, context=c).shape == (2, 7, 12)


def test_mha_equals_hand_computed_projection_and_softmax():
    H, F, D = 2, 8, 4
    mha = MultiHeadAttention(H, F, max_len=16, rngs=nnx.Rngs(3))
    x = _rand(0, (2, 5, F))
    kv_mask = jnp.array([[True] * 5, [True, True, True, False, False]])
    got = mha(x, mask=ea.Mask(kv_mask=kv_mask))

    def proj(lin, inp):
        return inp @ lin.kernel[...].reshape(F, H * D) + lin.bias[...].reshape(H * D)

    q, k, v = (proj(lin, x).reshape(2, 5, H, D) for lin in (mha.query, mha.key, mha.value))
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
    s = np.where(np.asarray(kv_mask)[:, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", p, v).reshape(2, 5, H * D)
    want = o @ np.asarray(mha.out.kernel[...]).reshape(H * D, F) + np.asarray(mha.out.bias[...])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast_exact", [True, False], ids=["blockwise_core", "full_core"])
def test_mha_takes_numpy_inputs_and_masks(fast_exact):
    """numpy x, context and kv_mask give what jax arrays give (the fast exact core included)."""
    mha = MultiHeadAttention(2, 8, max_len=16, attention="full", fast_exact=fast_exact, rngs=nnx.Rngs(1))
    x = np.asarray(_rand(0, (2, 5, 8)))
    kv_mask = np.array([[True] * 5, [True, True, True, False, False]])
    want = mha(jnp.asarray(x), mask=ea.Mask(kv_mask=jnp.asarray(kv_mask)))
    got = mha(x, mask=ea.Mask(kv_mask=kv_mask))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mha(x, context=x)), np.asarray(mha(jnp.asarray(x))), rtol=1e-6, atol=1e-6)


def test_mha_rejects_bad_sizes_and_unknown_variant():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(3, 8, max_len=8, rngs=nnx.Rngs(0))
    with pytest.raises(KeyError, match="unknown attention variant"):
        MultiHeadAttention(2, 8, max_len=8, attention="no_such_thing", rngs=nnx.Rngs(0))


def _small_enc(**kw):
    base = dict(vocab_size=12, max_len=16, num_classes=3, num_layers=2, emb_dim=16, num_heads=2, mlp_dim=32)
    base.update(kw)
    return EncoderConfig(**base)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_classifier_shape_and_padding_invariance(pool):
    model = Classifier(_small_enc(pool=pool), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 12, (3, 16)).astype(np.int32)
    lengths = np.array([16, 9, 4])
    mask = np.arange(16)[None] < lengths[:, None]
    logits = model(jnp.asarray(tokens), jnp.asarray(mask))
    assert logits.shape == (3, 3) and logits.dtype == jnp.float32
    other = np.where(mask, tokens, rng.integers(0, 12, tokens.shape)).astype(np.int32)
    assert (other != tokens).any()
    np.testing.assert_allclose(model(jnp.asarray(other), jnp.asarray(mask)), logits, rtol=1e-5, atol=1e-5)
    # without the mask the padding is read: the logits of padded rows change
    unmasked = model(jnp.asarray(other), None)
    assert not np.allclose(np.asarray(unmasked)[1:], np.asarray(logits)[1:], atol=1e-4)


def test_classifier_config_validation():
    with pytest.raises(ValueError, match="pool"):
        _small_enc(pool="max")
    with pytest.raises(ValueError, match="divisible"):
        _small_enc(emb_dim=15)
    cfg = _small_enc(attention_kwargs={})
    assert cfg.attention_kwargs == () and hash(cfg)
    with pytest.raises(ValueError, match="max_len"):
        Classifier(_small_enc(), rngs=nnx.Rngs(0))(jnp.zeros((1, 17), jnp.int32))


def _small_lm(**kw):
    base = dict(vocab_size=11, max_len=16, num_layers=2, emb_dim=16, num_heads=2, mlp_dim=32)
    base.update(kw)
    return LMConfig(**base)


def test_causal_lm_shape_and_no_leak():
    model = CausalLM(_small_lm(), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 11, (2, 16)).astype(np.int32)
    logits = np.asarray(model(jnp.asarray(tokens)))
    assert logits.shape == (2, 16, 11)
    changed = tokens.copy()
    changed[:, 10:] = (changed[:, 10:] + 1) % 11  # change the future from position 10 on
    logits2 = np.asarray(model(jnp.asarray(changed)))
    np.testing.assert_allclose(logits2[:, :10], logits[:, :10], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits2[:, 10:], logits[:, 10:], atol=1e-4)


def test_causal_lm_left_padding_masked():
    model = CausalLM(_small_lm(), rngs=nnx.Rngs(2))
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 11, (2, 16)).astype(np.int32)
    mask = np.ones((2, 16), bool)
    mask[1, :5] = False  # left padding: later queries would see it without the key mask
    logits = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    other = np.where(mask, tokens, (tokens + 3) % 11).astype(np.int32)
    logits2 = np.asarray(model(jnp.asarray(other), jnp.asarray(mask)))
    np.testing.assert_allclose(logits2[1, 5:], logits[1, 5:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits2[0], logits[0], rtol=1e-5, atol=1e-5)


def test_lm_refuses_non_causal_variant():
    @ea.register("_test_noncausal", config=ea.registry.get_spec("full").config)
    class NonCausal(ea.Attention):
        capabilities = ea.Capabilities(causal=False, kv_mask=True)

        def attend(self, q, k, v, mask):
            return q

    try:
        with pytest.raises(ValueError, match="causal"):
            _small_lm(attention="_test_noncausal")
    finally:
        ea.registry.unregister("_test_noncausal")


def test_bidirectional_lm_sees_the_future_and_refuses_to_generate():
    """LMConfig(causal=False): a bidirectional-only core runs unmasked (MQAR's layout allows it)."""
    with pytest.raises(ValueError, match="causal=False runs it bidirectionally"):
        _small_lm(attention="linformer", attention_kwargs=(("rank", 4),))
    cfg = _small_lm(attention="linformer", attention_kwargs=(("rank", 4),), causal=False)
    model = CausalLM(cfg, rngs=nnx.Rngs(3))
    tokens = np.random.default_rng(3).integers(0, 11, (2, 16)).astype(np.int32)
    changed = tokens.copy()
    changed[:, 12:] = (changed[:, 12:] + 1) % 11
    a, b = (np.asarray(model(jnp.asarray(t))) for t in (tokens, changed))
    assert not np.allclose(a[:, :12], b[:, :12], atol=1e-4)  # earlier positions see the changed later tokens
    # one layer: the last position attends every embedding either way (deeper, its inputs differ)
    bidir_full = CausalLM(_small_lm(causal=False, num_layers=1), rngs=nnx.Rngs(4))
    causal_full = CausalLM(_small_lm(num_layers=1), rngs=nnx.Rngs(4))  # same parameters, the causal mask on
    x = jnp.asarray(tokens)
    np.testing.assert_allclose(np.asarray(bidir_full(x))[:, -1], np.asarray(causal_full(x))[:, -1],
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(bidir_full(x))[:, 0], np.asarray(causal_full(x))[:, 0], atol=1e-4)
    with pytest.raises(ValueError, match="causal=False"):
        bidir_full.generate(x[:, :4], 2)
    with pytest.raises(ValueError, match="causal-only"):
        _small_lm(attention="retnet", causal=False)


def test_models_jit_and_grad():
    model = Classifier(_small_enc(), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 16), jnp.int32)
    mask = jnp.ones((2, 16), bool)

    @nnx.jit
    def loss(m):
        return jnp.mean(m(tokens, mask) ** 2)

    grads = nnx.grad(loss)(model)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)


@pytest.mark.parametrize("kind", ["classifier", "lm"])
def test_fast_exact_path_equals_einsum_reference(kind):
    """The fast exact path (full on the blockwise kernel) and the einsum reference: same
    logits and same parameter gradients, with padding (and the causal mask in the LM)."""
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 12)
    mask = jnp.arange(16)[None] < jnp.array([16, 9])[:, None]
    if kind == "lm":
        mask = mask[:, ::-1]  # left padding

    def make(fast):
        if kind == "classifier":
            return Classifier(_small_enc(fast_exact=fast), rngs=nnx.Rngs(0))
        return CausalLM(LMConfig(vocab_size=12, max_len=16, num_layers=2, emb_dim=16, num_heads=2, mlp_dim=32,
                                 fast_exact=fast), rngs=nnx.Rngs(0))

    fast, ref = make(True), make(False)
    assert fast.trunk.blocks[0].attn.fast_core is not None and ref.trunk.blocks[0].attn.fast_core is None

    def loss(m):
        out = m(tokens, mask)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    np.testing.assert_allclose(fast(tokens, mask), ref(tokens, mask), rtol=1e-5, atol=1e-5)
    g_fast = jax.tree.leaves(nnx.state(nnx.grad(loss)(fast), nnx.Param))
    g_ref = jax.tree.leaves(nnx.state(nnx.grad(loss)(ref), nnx.Param))
    assert len(g_fast) == len(g_ref)
    for a, b in zip(g_fast, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fast_exact_path_falls_back_to_einsum_for_a_dense_mask():
    mha = MultiHeadAttention(2, 8, max_len=16, rngs=nnx.Rngs(0))
    x = _rand(0, (1, 6, 8))
    dense = jnp.tril(jnp.ones((6, 6), bool))[None, None]
    got = mha(x, mask=ea.Mask(dense=dense))  # blockwise cannot take a dense mask: the einsum core runs
    np.testing.assert_allclose(got, mha(x, mask=ea.Mask(causal=True)), rtol=1e-5, atol=1e-5)


def test_position_embeddings_sinusoidal_table_and_learned_option():
    """The fixed table is Vaswani et al.'s formula, is not a trained parameter, and the
    model reads it (moving a token changes the logits); ``"learned"`` trains a table;
    an unknown kind is refused."""
    from efficient_attn.nn import sinusoidal_table

    table = np.asarray(sinusoidal_table(7, 6))
    p, i = 5, 1  # column 2i = sin(p / 10000^(2i/F)), 2i + 1 = cos(...)
    np.testing.assert_allclose(table[p, 2 * i], np.sin(p / 10000 ** (2 * i / 6)), rtol=1e-5)
    np.testing.assert_allclose(table[p, 2 * i + 1], np.cos(p / 10000 ** (2 * i / 6)), rtol=1e-5)
    assert np.asarray(sinusoidal_table(3, 5)).shape == (3, 5)

    fixed = Classifier(_small_enc(pool="mean", position="sinusoidal"), rngs=nnx.Rngs(0))
    learned = Classifier(_small_enc(pool="mean", position="learned"), rngs=nnx.Rngs(0))
    n_fixed = sum(x.size for x in jax.tree.leaves(nnx.state(fixed, nnx.Param)))
    n_learned = sum(x.size for x in jax.tree.leaves(nnx.state(learned, nnx.Param)))
    assert n_learned - n_fixed == 16 * 16  # the [max_len, emb_dim] table is trained only when learned
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, 3] = 5
    moved = np.zeros((1, 16), np.int32)
    moved[0, 9] = 5
    a, b = fixed(jnp.asarray(tokens)), fixed(jnp.asarray(moved))  # mean pooling: order only via positions
    assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    with pytest.raises(ValueError, match="position"):
        _small_enc(position="alibi")


def test_rotary_positions_rotate_pairs_and_give_relative_scores():
    """RoPE (Su et al. 2021): each feature pair (i, i + D/2) is rotated by p * base^(-2i/D),
    norms are kept, and the score of a rotated query and key depends on their offset only."""
    from efficient_attn.nn import rotate

    x = _rand(0, (1, 5, 2, 8))
    pos = jnp.arange(5)
    got = np.asarray(rotate(x, pos))
    p, i = 3, 1
    angle = p * 10000.0 ** (-2 * i / 8)
    a, b = np.asarray(x)[0, p, 0, i], np.asarray(x)[0, p, 0, i + 4]
    np.testing.assert_allclose(got[0, p, 0, i], a * np.cos(angle) - b * np.sin(angle), rtol=1e-5)
    np.testing.assert_allclose(got[0, p, 0, i + 4], a * np.sin(angle) + b * np.cos(angle), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-5)
    q, k = _rand(1, (1, 1, 1, 8)), _rand(2, (1, 1, 1, 8))

    def score(m, n):
        return float(jnp.sum(rotate(q, jnp.array([m])) * rotate(k, jnp.array([n]))))

    assert score(7, 4) == pytest.approx(score(13, 10), rel=1e-4)  # offset 3 both times
    assert score(7, 4) != pytest.approx(score(7, 6), rel=1e-3)


def test_rotary_model_has_no_position_table_and_sees_order():
    """position="rotary": no table (fewer parameters than "learned"), yet the causal LM's
    output at a position depends on where earlier tokens sit; every core gets rotated q, k."""
    learned = CausalLM(LMConfig(vocab_size=11, max_len=16, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32),
                       rngs=nnx.Rngs(0))
    rope_cfg = LMConfig(vocab_size=11, max_len=16, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32,
                        position="rotary")
    rope = CausalLM(rope_cfg, rngs=nnx.Rngs(0))
    n = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert n(learned) - n(rope) == 16 * 16
    a = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
    b = np.array([[2, 1, 3, 4, 5, 6, 7, 8]], np.int32)  # same set before position 2, other order
    la, lb = np.asarray(rope(jnp.asarray(a))), np.asarray(rope(jnp.asarray(b)))
    assert not np.allclose(la[0, 2], lb[0, 2], atol=1e-5)
    linear = CausalLM(LMConfig(vocab_size=11, max_len=16, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32,
                               position="rotary", attention="linear"), rngs=nnx.Rngs(0))
    assert np.isfinite(np.asarray(linear(jnp.asarray(a)))).all()
    with pytest.raises(ValueError, match="even"):
        MultiHeadAttention(2, 6, max_len=8, rotary=True, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["classifier", "lm"])
def test_out_of_range_token_id_raises_eagerly_naming_id_position_and_vocab(kind):
    model = (Classifier(_small_enc(num_layers=1), rngs=nnx.Rngs(0)) if kind == "classifier"
             else CausalLM(_small_lm(num_layers=1), rngs=nnx.Rngs(0)))
    vocab = model.cfg.vocab_size
    tokens = np.ones((2, 8), np.int32)
    tokens[1, 5] = vocab
    with pytest.raises(ValueError, match=rf"token id {vocab} at position \(1, 5\).*vocab_size={vocab}"):
        model(jnp.asarray(tokens))
    tokens[1, 5] = -1  # a negative id would wrap around to the last row of the table
    with pytest.raises(ValueError, match=r"token id -1 at position \(1, 5\)"):
        model(jnp.asarray(tokens))
    tokens[1, 5] = vocab - 1
    assert np.isfinite(np.asarray(model(jnp.asarray(tokens)))).all()
    if kind == "lm":
        with pytest.raises(ValueError, match=r"position 8 at position \(0, 1\).*\[0, 8\)"):
            model(jnp.asarray(tokens), positions=jnp.array([[0, 8], [1, 2]]))


@pytest.mark.parametrize("fast", [True, False])
def test_out_of_range_token_id_under_jit_gives_nan_rows_only(fast):
    """Traced ids cannot be checked before running: a row with an id outside [0, vocab_size)
    gets NaN logits (the fast exact path alone would drop a NaN embedding and answer with the
    logits of another sequence), and the other rows are the eager result."""
    clf = Classifier(_small_enc(num_layers=1, fast_exact=fast), rngs=nnx.Rngs(0))
    lm = CausalLM(_small_lm(num_layers=1, fast_exact=fast), rngs=nnx.Rngs(0))
    for model in (clf, lm):
        vocab = model.cfg.vocab_size
        good = np.asarray(jax.random.randint(jax.random.key(1), (4, 8), 0, vocab), np.int32)
        bad = good.copy()
        bad[1, 3], bad[2, 0] = vocab, -1
        got = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(bad)))
        want = np.asarray(model(jnp.asarray(good)))
        assert np.isnan(got[1]).all() and np.isnan(got[2]).all()
        np.testing.assert_allclose(got[[0, 3]], want[[0, 3]], rtol=1e-5, atol=1e-5)
    pos = jnp.array([[0, 7], [1, 8], [2, -1], [3, 4]])
    tokens = jnp.asarray(good)
    got = np.asarray(nnx.jit(lambda m, t, p: m(t, positions=p))(lm, tokens, pos))
    assert np.isnan(got[1]).all() and np.isnan(got[2]).all() and np.isfinite(got[[0, 3]]).all()


def test_models_declare_their_optional_inputs():
    assert Classifier.accepts == frozenset({"dropout_key"})
    assert CausalLM.accepts == frozenset({"dropout_key", "positions", "segment_ids"})


def test_fast_exact_twin_is_the_registered_one():
    """The twin comes from the registry (``fast_exact`` of the variant's spec), not from a
    name in nn.py: a plugin declaring a twin gets it, hyperparameters turn it off, a variant
    without one runs itself; a call the twin cannot take (dense mask) runs the variant."""
    calls = []

    @dataclasses.dataclass(frozen=True)
    class SlowConfig:
        unused: int = 0

    @ea.register("_test_slow_exact", config=SlowConfig, fast_exact="blockwise")
    class SlowExact(ea.Attention):
        capabilities = ea.Capabilities(causal=True, cross=True, kv_mask=True, dense_mask=True, exact=True)

        def attend(self, q, k, v, mask):
            calls.append(mask)
            return ea.build("full", num_heads=q.shape[2], head_dim=q.shape[3], max_len=self.dims.max_len)(
                q, k, v, mask=mask)

    try:
        mha = MultiHeadAttention(2, 8, max_len=16, attention="_test_slow_exact", rngs=nnx.Rngs(0))
        assert type(mha.fast_core).variant_name == ea.registry.get_spec("_test_slow_exact").fast_exact
        x = _rand(0, (1, 6, 8))
        fast = mha(x, mask=ea.Mask(causal=True))
        assert calls == []  # the twin ran
        dense = jnp.tril(jnp.ones((6, 6), bool))[None, None]
        np.testing.assert_allclose(mha(x, mask=ea.Mask(dense=dense)), fast, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1  # blockwise takes no dense mask: the variant itself ran
        off = MultiHeadAttention(2, 8, max_len=16, attention="_test_slow_exact", fast_exact=False, rngs=nnx.Rngs(0))
        assert off.fast_core is None
        tuned = MultiHeadAttention(2, 8, max_len=16, attention="_test_slow_exact", attention_kwargs={"unused": 1},
                                   rngs=nnx.Rngs(0))
        assert tuned.fast_core is None  # the twin is built at its defaults: not the same function here
    finally:
        ea.registry.unregister("_test_slow_exact")
    assert ea.registry.get_spec("local").fast_exact is None
    assert MultiHeadAttention(2, 8, max_len=16, attention="local", rngs=nnx.Rngs(0)).fast_core is None


# ----------------------------------------------------------------------------- short convolution


def test_short_conv_is_the_causal_depthwise_formula():
    from efficient_attn.nn import ShortConv

    conv = ShortConv(6, 3, rngs=nnx.Rngs(0))
    x = _rand(1, (2, 9, 6))
    conv.bias[...] = jnp.asarray(np.arange(6, dtype=np.float32) * 0.1)  # a non-zero bias is applied
    w, b = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])
    xn = np.asarray(x)
    want = xn + b + sum(w[j] * np.pad(xn, ((0, 0), (j, 0), (0, 0)))[:, :9] for j in range(3))
    np.testing.assert_allclose(np.asarray(conv(x)), want, rtol=1e-5, atol=1e-6)
    # position t reads x_t, x_{t-1}, x_{t-2} and nothing later or earlier
    grad = jax.grad(lambda x: conv(x)[0, 5, 2])(x)
    touched = np.flatnonzero(np.abs(np.asarray(grad[0, :, 2])) > 0)
    others = np.delete(np.asarray(grad[0]), 2, axis=1)  # depthwise: no other feature is read
    assert list(touched) == [3, 4, 5] and np.abs(others).max() == 0
    # padded positions are read as zeros
    mask = np.ones((2, 9), bool)
    mask[1, :4] = False
    other = np.asarray(x).copy()
    other[1, :4] += 100.0
    np.testing.assert_allclose(np.asarray(conv(jnp.asarray(other), jnp.asarray(mask)))[1, 4:],
                               np.asarray(conv(x, jnp.asarray(mask)))[1, 4:], rtol=1e-5, atol=1e-5)


def test_short_conv_option_off_by_default_and_leaves_other_layers_alone():
    plain = CausalLM(_small_lm(), rngs=nnx.Rngs(3))
    assert plain.cfg.short_conv == 0 and plain.conv is None
    conv = CausalLM(_small_lm(short_conv=4), rngs=nnx.Rngs(3))
    assert conv.conv.kernel[...].shape == (4, conv.cfg.emb_dim)
    p_plain = nnx.state(plain, nnx.Param)
    p_conv = nnx.state(conv, nnx.Param)
    n_plain = sum(x.size for x in jax.tree.leaves(p_plain))
    n_conv = sum(x.size for x in jax.tree.leaves(p_conv))
    assert n_conv - n_plain == 5 * conv.cfg.emb_dim  # kernel 4 x F + bias F, nothing else
    # created last: every other parameter is initialised as without it
    np.testing.assert_array_equal(np.asarray(plain.head.kernel[...]), np.asarray(conv.head.kernel[...]))
    np.testing.assert_array_equal(np.asarray(plain.trunk.tok.embedding[...]), np.asarray(conv.trunk.tok.embedding[...]))
    enc, enc_conv = Classifier(_small_enc(), rngs=nnx.Rngs(3)), Classifier(_small_enc(short_conv=3), rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(np.asarray(enc.head_out.kernel[...]), np.asarray(enc_conv.head_out.kernel[...]))
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="short_conv"):
            _small_lm(short_conv=bad)


@pytest.mark.parametrize("kind", ["classifier", "lm"])
def test_models_with_short_conv_stay_causal_and_padding_blind(kind):
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 11, (2, 16)).astype(np.int32)
    if kind == "lm":
        model = CausalLM(_small_lm(short_conv=3), rngs=nnx.Rngs(4))
        logits = np.asarray(model(jnp.asarray(tokens)))
        changed = tokens.copy()
        changed[:, 10:] = (changed[:, 10:] + 1) % 11
        logits2 = np.asarray(model(jnp.asarray(changed)))
        np.testing.assert_allclose(logits2[:, :10], logits[:, :10], rtol=1e-5, atol=1e-5)
        assert not np.allclose(logits2[:, 10:], logits[:, 10:], atol=1e-4)
        # with the convolution, position t depends on the token at t - 1 even with attention
        # reading nothing but itself: a one-layer model's logits at 5 change with token 4
        one = CausalLM(_small_lm(short_conv=3, num_layers=1), rngs=nnx.Rngs(4))
        prev = tokens.copy()
        prev[:, 4] = (prev[:, 4] + 1) % 11
        assert not np.allclose(np.asarray(one(jnp.asarray(prev)))[:, 5], np.asarray(one(jnp.asarray(tokens)))[:, 5])
    else:
        model = Classifier(_small_enc(short_conv=3), rngs=nnx.Rngs(4))
        mask = np.ones((2, 16), bool)
        mask[:, 12:] = False  # right padding, as the tasks pad
        out = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
        other = np.where(mask, tokens, (tokens + 5) % 11).astype(np.int32)
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(other), jnp.asarray(mask))), out, rtol=1e-5, atol=1e-5)
