"""Decoding, for every registered variant: prefill + one step per token == the causal forward.

Every variant whose capabilities say ``decode`` is built at its ``pattern_setting`` (the
small-N hyperparameters, so that windows, blocks and selections are exercised at these
lengths) and decoded in one jitted program: ``init_state``, ``prefill`` of a prompt with key
padding, then ``lax.scan`` of ``step`` over the rest of the sequence (odd length 37). The
outputs must equal the causal forward over the whole sequence at every position, in float32
(a padded prompt of 11) and bfloat16 (a prompt of 1: all but one token by steps). The state
must keep its sizes from position to position. Decoders that claim ``gqa`` decode k, v of
one head shared by the H query heads too, with a state sized by the kv heads. Variants
without ``decode`` refuse.
Errors of the state API (a step past max_len, another variant's or batch's state, a used
state, a non-causal prefill, ...) are checked on the first decoding variants.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from conformance.harness import B, D, H, MAX_LEN, VARIANTS, caps

DECODERS = [v for v in VARIANTS if caps(v).decode]
REFUSERS = [v for v in VARIANTS if not caps(v).decode]

N, PROMPT = 37, 11  # odd total length, a prompt that is not a multiple of any block


def _module(name: str, seed: int = 0, **hp):
    setting = {**ea.get_spec(name).pattern_setting, **hp}
    return ea.build(name, num_heads=H, head_dim=D, max_len=MAX_LEN, rngs=nnx.Rngs(seed), **setting)


def _inputs(dtype=jnp.float32, seed: int = 3):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(key, (B, N, H, D), jnp.float32).astype(dtype) for key in (kq, kk, kv))
    real = np.ones((B, N), bool)
    real[0, :2] = False  # left padding of the first prompt
    real[1, 5] = False  # a hole in the second
    return q, k, v, jnp.asarray(real)


def _forward(module, q, k, v, real, q_mask):
    graphdef, state = nnx.split(module)

    def run(st, q, k, v, real, q_mask):
        mask = ea.Mask(causal=True, kv_mask=real, q_mask=q_mask)
        return nnx.merge(graphdef, st, copy=True)(q, k, v, mask=mask)

    return jax.jit(run)(state, q, k, v, real, q_mask)


def _decode(module, q, k, v, real, q_mask, *, prompt: int, dtype):
    """Prefill ``prompt`` tokens, then scan ``step`` over the rest: one jitted program that
    returns the outputs at every position, the empty state and the final state."""
    graphdef, state = nnx.split(module)

    def run(st, q, k, v, real, q_mask):
        m = nnx.merge(graphdef, st, copy=True)
        empty = m.init_state(q.shape[0], max_len=q.shape[1], dtype=dtype)
        mask = ea.Mask(causal=True, kv_mask=real[:, :prompt], q_mask=q_mask[:, :prompt])
        head, s = m.prefill(q[:, :prompt], k[:, :prompt], v[:, :prompt], empty, mask=mask)

        def one(s, xs):
            out, s = m.step(*(x[:, None] for x in xs), s)
            return s, out[:, 0]

        s, tail = jax.lax.scan(one, s, tuple(jnp.moveaxis(x[:, prompt:], 1, 0) for x in (q, k, v)))
        return jnp.concatenate([head, jnp.moveaxis(tail, 0, 1)], axis=1), empty, s

    return jax.jit(run)(state, q, k, v, real, q_mask)


def _jitted_step(module):
    graphdef, state = nnx.split(module)
    return jax.jit(lambda st, *a: nnx.merge(graphdef, st, copy=True).step(*a)), state


def _shapes(state):
    return [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state.data)]


# (dtype, prompt length, tolerance): f32 with a padded prompt in CI; bf16 nearly all by steps in
# the slow tier (`make test-slow`: a second compile of every decoder, the suite's budget)
CASES = [
    pytest.param(jnp.float32, PROMPT, 5e-5, id="f32"),
    pytest.param(jnp.bfloat16, 1, 3e-2, id="bf16", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("dtype, prompt, tol", CASES)
@pytest.mark.parametrize("name", DECODERS)
def test_decode_equals_causal_forward(name, dtype, prompt, tol):
    """init_state, prefill, then lax.scan of jitted steps == the causal forward at every
    position (key padding and q_mask in the prompt); the state keeps its sizes throughout."""
    module = _module(name)
    q, k, v, real = _inputs(dtype)
    q_mask = real if prompt > 1 else jnp.ones_like(real)
    real = real if prompt > 1 else jnp.ones_like(real)
    want = _forward(module, q, k, v, real, q_mask).astype(jnp.float32)
    got, empty, final = _decode(module, q, k, v, real, q_mask, prompt=prompt, dtype=dtype)
    assert got.dtype == dtype
    assert int(final.position) == N and int(empty.position) == 0
    assert _shapes(empty) == _shapes(final), f"{name}: the state changed size from position 0 to {N}"
    got = got.astype(jnp.float32)
    for t in range(N):  # position by position, so that a failure names where decoding departs
        np.testing.assert_allclose(got[:, t], want[:, t], rtol=tol, atol=tol,
                                   err_msg=f"{name}: decoded output at position {t} != causal forward "
                                   f"({np.dtype(dtype).name}, prompt of {prompt})")
    if prompt > 1:
        assert bool(jnp.all(got[:, :prompt][~np.asarray(q_mask[:, :prompt])] == 0)), "q_mask rows not zero"


GQA_DECODERS = [v for v in DECODERS if caps(v).gqa]
HKV = 1  # H = 2 query heads share one key/value head (multi-query, the extreme of grouping)


@pytest.mark.parametrize("name", GQA_DECODERS)
def test_grouped_query_decode_equals_causal_forward(name):
    """A decoder that claims gqa, built with num_kv_heads < H: prefill + steps of k, v with Hkv
    heads == its own causal forward at every position (padded prompt, float32), and its state
    is sized by the kv heads, not the query heads (test_gqa holds that forward to the same
    variant on k, v repeated per query head)."""
    module = _module(name, num_kv_heads=HKV)
    full_heads = _module(name)
    q, k, v, real = _inputs()
    k, v = k[:, :, :HKV], v[:, :, :HKV]
    want = _forward(module, q, k, v, real, real)
    got, empty, final = _decode(module, q, k, v, real, real, prompt=PROMPT, dtype=jnp.float32)
    assert _shapes(empty) == _shapes(final), f"{name}: the grouped state changed size"
    grouped = sum(x.size for x in jax.tree_util.tree_leaves(empty.data))
    per_head = sum(x.size for x in jax.tree_util.tree_leaves(full_heads.init_state(B, max_len=N).data))
    assert grouped < per_head, f"{name}: a state of {HKV} kv heads holds {grouped} values, H={H} heads' {per_head}"
    for t in range(N):
        np.testing.assert_allclose(got[:, t], want[:, t], rtol=5e-5, atol=5e-5,
                                   err_msg=f"{name}: grouped-query decoding at position {t} != causal forward")


@pytest.mark.parametrize("name", REFUSERS)
def test_variant_without_decode_refuses(name):
    module = ea.build(name, num_heads=H, head_dim=D, max_len=MAX_LEN, rngs=nnx.Rngs(0))
    with pytest.raises(ea.CapabilityError, match="decode"):
        module.init_state(B)
    q = jnp.zeros((B, 1, H, D))
    with pytest.raises(ea.CapabilityError, match="decode"):
        module.step(q, q, q, None)
    with pytest.raises(ea.CapabilityError, match="decode"):
        module.prefill(q, q, q, None)


# --------------------------------------------------------------------- the API's refusals

pytestmark_api = pytest.mark.skipif(len(DECODERS) < 2, reason="needs two decoding variants")


def _token(seed=0, batch=B):
    return jax.random.normal(jax.random.key(seed), (batch, 1, H, D))


@pytestmark_api
def test_step_past_max_len_raises_eagerly():
    module = _module(DECODERS[0])
    s = module.init_state(B, max_len=2)
    x = _token()
    for _ in range(2):
        _, s = module.step(x, x, x, s)
    with pytest.raises(ValueError, match="past the state's max_len=2"):
        module.step(x, x, x, s)


@pytestmark_api
@pytest.mark.parametrize("name", DECODERS[:2])
def test_step_past_max_len_under_jit_is_nan(name):
    """Under jit the position is traced: no error, the output is NaN, and stays NaN."""
    module = _module(name)
    step, split = _jitted_step(module)
    s = module.init_state(B, max_len=2)
    outs = []
    for t in range(4):
        x = _token(t)
        out, s = step(split, x, x, x, s)
        outs.append(out)
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in outs[:2])
    assert all(bool(jnp.all(jnp.isnan(o))) for o in outs[2:])


@pytestmark_api
def test_state_of_another_variant_refused():
    a, b = _module(DECODERS[0]), _module(DECODERS[1])
    x = _token()
    with pytest.raises(ValueError, match=f"state of variant '{DECODERS[1]}'"):
        a.step(x, x, x, b.init_state(B))


@pytestmark_api
def test_state_of_another_batch_or_configuration_refused():
    name = DECODERS[0]
    module = _module(name)
    x = _token()
    with pytest.raises(ValueError, match="init_state\\(batch=2"):
        module.step(x, x, x, module.init_state(B + 1))
    other = ea.build(name, num_heads=H, head_dim=D, max_len=MAX_LEN // 2)
    with pytest.raises(ValueError, match="another configuration or size"):
        module.step(x, x, x, other.init_state(B))
    with pytest.raises(TypeError, match="made by init_state"):
        module.step(x, x, x, {"position": 0})


@pytestmark_api
def test_bad_tokens_and_prompts_refused():
    module = _module(DECODERS[0])
    s = module.init_state(B, max_len=8)
    two = jnp.zeros((B, 2, H, D))
    with pytest.raises(ValueError, match="step takes one token"):
        module.step(two, two, two, s)
    with pytest.raises(ValueError, match="built for head_dim"):
        y = jnp.zeros((B, 1, H, D + 1))
        module.step(y, y, y, s)
    with pytest.raises(TypeError, match="floating"):
        z = jnp.zeros((B, 1, H, D), jnp.int32)
        module.step(z, z, z, s)
    with pytest.raises(ValueError, match="attends causally"):
        module.prefill(two, two, two, s, mask=ea.Mask())
    with pytest.raises(ValueError, match="does not fit a state of max_len=1"):
        module.prefill(two, two, two, module.init_state(B, max_len=1))
    _, used = module.prefill(two, two, two, s)
    with pytest.raises(ValueError, match="already holds 2 tokens"):
        module.prefill(two, two, two, used)
    with pytest.raises(ValueError, match="exceeds max_len"):
        module.init_state(B, max_len=MAX_LEN + 1)
    with pytest.raises(ValueError, match="positive int"):
        module.init_state(0)


@pytestmark_api
def test_used_state_given_to_prefill_under_jit_is_nan():
    module = _module(DECODERS[0])
    graphdef, split = nnx.split(module)
    prefill = jax.jit(lambda st, q, s: nnx.merge(graphdef, st, copy=True).prefill(q, q, q, s))
    q = jax.random.normal(jax.random.key(0), (B, 2, H, D))
    s = module.init_state(B, max_len=8)
    out, s = prefill(split, q, s)
    assert bool(jnp.all(jnp.isfinite(out)))
    again, _ = prefill(split, q, s)
    assert bool(jnp.all(jnp.isnan(again)))


@pytestmark_api
def test_state_is_a_pytree_with_static_identity():
    module = _module(DECODERS[0])
    s = module.init_state(B, max_len=8)
    leaves, treedef = jax.tree_util.tree_flatten(s)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert dataclasses.asdict(back)["variant"] == DECODERS[0]
    assert back.max_len == 8 and back.batch == B
