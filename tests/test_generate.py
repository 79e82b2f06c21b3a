"""``CausalLM.generate``: greedy decoding equals re-running the model on the growing sequence.

For every decode-capable core (at its pattern setting, so that windows and blocks are smaller
than the sequence) a small LM generates greedily; the reference re-runs the full forward on
the sequence so far and takes the argmax of its last real position. The re-run is done at the
generation's total length, the not-yet-generated positions filled with random tokens: a
causal model cannot see them, and a variant whose pattern depends on the length (cosFormer's
M, a stride from N) decodes with the state's max_len = that total. The whole generation is
one compiled program (its trace is counted), for any number of new tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn import nn

DECODERS = [v for v in ea.list_variants() if ea.get_spec(v).capabilities.decode]
REFUSERS = [v for v in ea.list_variants() if not ea.get_spec(v).capabilities.decode and ea.get_spec(v).capabilities.causal]
POSITIONS = ("learned", "rotary", "sinusoidal")
VOCAB, PROMPT, NEW = 13, 5, 7
TOTAL = PROMPT + NEW


def _lm(name: str, *, layers: int = 1, position: str = "learned", short_conv: int = 0, seed: int = 0):
    cfg = nn.LMConfig(vocab_size=VOCAB, max_len=16, num_layers=layers, emb_dim=16, num_heads=2, mlp_dim=32,
                      attention=name, attention_kwargs=ea.get_spec(name).pattern_setting, position=position,
                      short_conv=short_conv)
    return nn.CausalLM(cfg, rngs=nnx.Rngs(seed))


def _rerun_greedy(lm, prompt, new: int, mask=None, seed: int = 9):
    """argmax of the forward's logits at the last position, re-run after every new token."""
    graphdef, state = nnx.split(lm)
    forward = jax.jit(lambda st, t, m: nnx.merge(graphdef, st, copy=True)(t, m))
    rng = np.random.default_rng(seed)
    seq = np.asarray(prompt)
    B, P = seq.shape
    full_mask = None if mask is None else np.concatenate([np.asarray(mask), np.ones((B, new), bool)], 1)
    for _ in range(new):
        filler = rng.integers(0, VOCAB, (B, P + new - seq.shape[1]))
        logits = forward(state, jnp.asarray(np.concatenate([seq, filler], 1)),
                         None if full_mask is None else jnp.asarray(full_mask))
        seq = np.concatenate([seq, np.argmax(np.asarray(logits[:, seq.shape[1] - 1]), -1)[:, None]], 1)
    return seq


def _prompt(seed=1, batch=2):
    return jax.random.randint(jax.random.key(seed), (batch, PROMPT), 0, VOCAB)


# CI: one decoder of each kind of state (KV cache, window ring buffer, fixed linear state,
# delta-rule state, block selection over the cache); every decoder in the slow tier. Decoding
# itself equals the causal forward for every decoder in conformance/test_decode.py.
_CI_DECODERS = ("full", "local", "linear", "deltanet", "moba")


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in _CI_DECODERS else [pytest.mark.slow])
                                  for n in DECODERS])
def test_greedy_generation_equals_rerun_argmax(name):
    position = POSITIONS[DECODERS.index(name) % len(POSITIONS)]
    lm = _lm(name, position=position)
    prompt = _prompt()
    got = lm.generate(prompt, NEW)
    assert got.shape == (2, TOTAL) and got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got[:, :PROMPT]), np.asarray(prompt))
    np.testing.assert_array_equal(np.asarray(got), _rerun_greedy(lm, prompt, NEW),
                                  err_msg=f"{name} ({position} positions): greedy generation != re-run argmax")


def test_two_layers_short_conv_and_left_padding():
    name = DECODERS[0]
    lm = _lm(name, layers=2, short_conv=3, position="rotary")
    prompt = _prompt(seed=2)
    mask = jnp.asarray([[False, False, True, True, True], [True] * PROMPT])
    got = lm.generate(prompt, NEW, mask=mask)
    np.testing.assert_array_equal(np.asarray(got), _rerun_greedy(lm, prompt, NEW, mask=mask))


def test_compiled_once_whatever_the_number_of_tokens():
    lm = _lm(DECODERS[0])
    before = nn._GENERATE_TRACES["count"]
    a = lm.generate(_prompt(3, batch=3), NEW)  # a batch no other test uses: a fresh compile
    assert nn._GENERATE_TRACES["count"] == before + 1, "one trace for all NEW tokens (a scan, not a loop)"
    b = lm.generate(_prompt(4, batch=3), NEW)  # same shapes and settings: the compiled program is reused
    assert nn._GENERATE_TRACES["count"] == before + 1
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    lm.generate(_prompt(4, batch=3), NEW - 2)  # another length: one more trace, not NEW - 2 of them
    assert nn._GENERATE_TRACES["count"] == before + 2


def test_sampling_stays_in_top_k_and_follows_the_key():
    lm = _lm(DECODERS[0])
    prompt = _prompt(5)
    greedy = lm.generate(prompt, NEW)
    one = lm.generate(prompt, NEW, temperature=0.7, top_k=1, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(greedy), err_msg="top_k=1 must be greedy")
    s1 = lm.generate(prompt, NEW, temperature=1.5, top_k=3, rng=jax.random.key(1))
    s1_again = lm.generate(prompt, NEW, temperature=1.5, top_k=3, rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s1_again))
    logits = jax.jit(lambda t: lm(t))(s1)
    for t in range(PROMPT, TOTAL):  # each sampled token is among the 3 most likely given its past
        top3 = np.argsort(np.asarray(logits[:, t - 1]), -1)[:, -3:]
        assert all(int(s1[b, t]) in top3[b] for b in range(2)), f"token at {t} outside the top 3"
    others = {tuple(np.asarray(lm.generate(prompt, NEW, temperature=1.5, rng=jax.random.key(s))).ravel())
              for s in range(2, 6)}
    assert len(others) > 1, "different keys should give different samples"


def test_bad_requests_refused():
    lm = _lm(DECODERS[0])
    prompt = _prompt()
    with pytest.raises(ValueError, match="exceeds max_len=16"):
        lm.generate(prompt, 12)
    with pytest.raises(ValueError, match="rng=jax.random.key"):
        lm.generate(prompt, 2, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        lm.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        lm.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(prompt, 0)
    with pytest.raises(ValueError, match="token id 13"):
        lm.generate(prompt.at[0, 0].set(VOCAB), 2)


@pytest.mark.skipif(not REFUSERS, reason="every causal variant decodes")
def test_core_without_decode_refuses():
    lm = _lm(REFUSERS[0])
    with pytest.raises(ea.CapabilityError, match="decode"):
        lm.generate(_prompt(), 2)
