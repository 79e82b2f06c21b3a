"""The chunked delta-rule engine against its token-by-token reference, forward and backward.

Reference: ``efficient_attn.ops.reference.delta_rule.delta_rule_recurrent`` (one scan step per
token, the recurrence as written). Keys are L2-normalised here, as the variants do before
calling the engine. Everything is jitted once per configuration.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn.ops.delta_rule import delta_rule_attention, delta_rule_step
from efficient_attn.ops.reference.delta_rule import delta_rule_recurrent
from jaxpr_tools import max_intermediate_elems

B, H, DK, DV = 2, 2, 8, 6
T0, C0 = 37, 16  # the main configuration: most tests reuse its compiled functions
ARGS = ("q", "k", "v", "beta", "log_decay", "initial_state")


def assert_close(name, got, want, rtol=1e-4, atol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@functools.lru_cache(maxsize=None)
def _numpy_inputs(T, seed):
    # numpy, not jax.random: drawing under jit costs seconds of compile per shape on the CPU
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, T, H, DK))
    return dict(
        q=rng.standard_normal((B, T, H, DK)),
        k=k / np.linalg.norm(k, axis=-1, keepdims=True),
        v=rng.standard_normal((B, T, H, DV)),
        beta=_sigmoid(2.0 * rng.standard_normal((B, T, H))),
        log_decay=-np.logaddexp(0.0, rng.standard_normal((B, T, H)) - 1.0),  # -softplus
        initial_state=0.5 * rng.standard_normal((B, H, DK, DV)),
    )


def _inputs(T, seed=0):
    return {n: jnp.asarray(a, jnp.float32) for n, a in _numpy_inputs(T, seed).items()}


def _cotangents(T, seed=7):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.standard_normal((B, T, H, DV)), jnp.float32),
        jnp.asarray(rng.standard_normal((B, H, DK, DV)), jnp.float32),
    )


@functools.lru_cache(maxsize=None)
def _loss_and_grads(impl: str, chunk: int = 0, gated: bool = True, masked: bool = False):
    """jit(value_and_grad) of <out, w_out> + <final_state, w_state> over every float argument."""
    names = ARGS if gated else tuple(a for a in ARGS if a != "log_decay")

    def loss(args, kv_mask, w_out, w_state):
        kw = dict(args)
        ld = kw.pop("log_decay", None)
        kw.update(kv_mask=kv_mask if masked else None, output_final_state=True)
        if impl == "engine":
            out, final = delta_rule_attention(log_decay=ld, chunk=chunk, **kw)
        else:
            out, final = delta_rule_recurrent(log_decay=ld, **kw)
        return jnp.sum(out * w_out) + jnp.sum(final * w_state), (out, final)

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def run(inputs, kv_mask=None, cot=None):
        args = {n: inputs[n] for n in names}
        (_, (out, final)), grads = grad(args, kv_mask, *cot)
        return out, final, grads

    return run


def _compare(T, chunk, gated=True, masked=False, kv_mask=None, inputs=None, rtol=1e-4, atol=2e-5):
    inputs = _inputs(T) if inputs is None else inputs
    cot = _cotangents(T)
    got = _loss_and_grads("engine", chunk, gated, masked)(inputs, kv_mask, cot)
    want = _loss_and_grads("reference", 0, gated, masked)(inputs, kv_mask, cot)
    assert_close("out", got[0], want[0], rtol, atol)
    assert_close("final_state", got[1], want[1], rtol, atol)
    for name in want[2]:
        assert_close("d" + name, got[2][name], want[2][name], rtol, atol)
    return got


# every length in (1, 7, 37, 65) and every chunk size in (1, 8, 16, 64), in five pairs: a
# chunk longer than the sequence, chunks of one token, one padded chunk, several chunks with
# a padded tail, and a last chunk of a single token (each pair is one compile, ~2 s of CPU)
@pytest.mark.parametrize("T, chunk", [(1, 64), (7, 1), (7, 8), (T0, C0), (65, 64)])
def test_chunked_equals_recurrence_gated(T, chunk):
    _compare(T, chunk, gated=True)


def test_chunked_equals_recurrence_ungated():
    _compare(T0, C0, gated=False)


def test_kv_mask_equals_recurrence_and_ignores_nan_at_masked_positions():
    T, chunk = T0, C0
    m = np.random.default_rng(3).random((B, T)) > 0.3
    m[1, :5] = False  # the first queries of batch 1 see no real token
    kv_mask = jnp.asarray(m)
    clean = _inputs(T)
    got = _compare(T, chunk, masked=True, kv_mask=kv_mask, inputs=clean)

    hidden = ~kv_mask
    dirty = dict(clean)
    for name, bad in (("k", jnp.nan), ("v", jnp.inf), ("beta", jnp.nan), ("log_decay", -jnp.inf)):
        x = clean[name]
        hid = hidden.reshape(hidden.shape + (1,) * (x.ndim - 2))
        dirty[name] = jnp.where(hid, bad, x)
    again = _loss_and_grads("engine", chunk, True, True)(dirty, kv_mask, _cotangents(T))
    assert_close("out", again[0], got[0], rtol=0, atol=0)
    assert_close("final_state", again[1], got[1], rtol=0, atol=0)
    for name in got[2]:
        assert_close("d" + name, again[2][name], got[2][name], rtol=0, atol=0)
    # a masked token is an identity step: no gradient reaches what it held
    for name in ("k", "v", "beta", "log_decay"):
        g = np.asarray(got[2][name])
        assert np.all(g[np.asarray(hidden)] == 0), f"d{name} nonzero at a masked position"
    # from a zero initial state, queries that see only masked tokens read zeros
    no_init = dict(clean, initial_state=jnp.zeros_like(clean["initial_state"]))
    out0, _, _ = _loss_and_grads("engine", chunk, True, True)(no_init, kv_mask, _cotangents(T))
    np.testing.assert_array_equal(np.asarray(out0[1, :5]), 0.0)


@pytest.mark.parametrize("impl", ["engine", "reference"])
def test_beta_zero_leaves_state_unchanged(impl):
    T = T0
    x = _inputs(T)
    x["beta"] = jnp.zeros_like(x["beta"])
    cot = _cotangents(T)
    run = _loss_and_grads(impl, C0, False)
    out, final, _ = run(x, None, cot)
    assert_close("final_state", final, x["initial_state"], rtol=0, atol=0)
    want = jnp.einsum("bthk,bhkv->bthv", x["q"] * DK**-0.5, x["initial_state"])
    assert_close("out", out, want, atol=1e-6)
    out, final, _ = run(dict(x, initial_state=jnp.zeros_like(x["initial_state"])), None, cot)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    np.testing.assert_array_equal(np.asarray(final), 0.0)


@pytest.mark.parametrize("impl", ["engine", "reference"])
def test_beta_one_with_orthonormal_keys_overwrites(impl):
    """Each read of key e returns exactly the last value written to e (0 if never written)."""
    T, D = T0, DK
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((D, D)))  # orthonormal columns
    key_ids = rng.integers(0, D, (B, T, H))
    query_ids = rng.integers(0, D, (B, T, H))
    values = rng.standard_normal((B, T, H, DV)).astype(np.float32)
    expect = np.zeros((B, T, H, DV), np.float32)
    for b in range(B):
        for h in range(H):
            memory = {}
            for t in range(T):
                memory[key_ids[b, t, h]] = values[b, t, h]
                expect[b, t, h] = memory.get(query_ids[b, t, h], 0.0)
    x = dict(  # q times sqrt(D) cancels the engine's default scale D^-1/2: reads are exact
        q=jnp.asarray(basis.T[query_ids] * np.sqrt(D), jnp.float32),
        k=jnp.asarray(basis.T[key_ids], jnp.float32),
        v=jnp.asarray(values),
        beta=jnp.ones((B, T, H)),
        initial_state=jnp.zeros((B, H, D, DV)),
    )
    out, _, _ = _loss_and_grads(impl, C0, False)(x, None, _cotangents(T))
    assert_close("out", out, expect, rtol=0, atol=1e-5)


def test_gated_with_zero_log_decay_equals_ungated():
    T, chunk = T0, C0
    x = _inputs(T)
    x["log_decay"] = jnp.zeros_like(x["log_decay"])
    cot = _cotangents(T)
    gated = _loss_and_grads("engine", chunk, True)(x, None, cot)
    plain = _loss_and_grads("engine", chunk, False)(x, None, cot)
    assert_close("out", gated[0], plain[0], rtol=1e-6, atol=1e-6)
    assert_close("final_state", gated[1], plain[1], rtol=1e-6, atol=1e-6)
    for name in plain[2]:
        assert_close("d" + name, gated[2][name], plain[2][name], rtol=1e-6, atol=1e-6)


def test_gate_of_exactly_zero_forgets_everything_before():
    """log_decay = -inf at position p (allowed): finite, equal to the reference forward and
    backward, and nothing before p reaches an output from p on."""
    T, p = T0, 21  # p inside the second chunk of C0 = 16
    x = _inputs(T)
    x["log_decay"] = x["log_decay"].at[:, p].set(-jnp.inf)
    got = _compare(T, C0, inputs=x)
    other = _inputs(T, seed=5)
    before = (jnp.arange(T) < p)[None, :, None]
    y = dict(x, initial_state=other["initial_state"])
    for name in ("k", "v", "beta"):
        hid = before.reshape(before.shape + (1,) * (x[name].ndim - 3))
        y[name] = jnp.where(hid, other[name], x[name])
    again = _loss_and_grads("engine", C0, True)(y, None, _cotangents(T))
    assert_close("out from p", again[0][:, p:], got[0][:, p:], rtol=1e-5, atol=1e-6)
    assert_close("final_state", again[1], got[1], rtol=1e-5, atol=1e-6)


def test_bfloat16_and_extreme_gates_are_finite_and_float32_inside():
    T, chunk = T0, C0
    x = _inputs(T)
    half = jnp.broadcast_to(jnp.arange(T)[None, :, None] % 2 == 0, (B, T, H))
    x["beta"] = jnp.where(half, 1e-4, 1.0 - 1e-3)  # writes near 0 and near 1
    x["log_decay"] = jnp.where(half, -1e-5, -30.0)  # gates near 1 and near 0 (e^-30)
    x16 = {n: a.astype(jnp.bfloat16) for n, a in x.items()}
    cot = _cotangents(T)
    out, final, grads = _loss_and_grads("engine", chunk, True)(x16, None, cot)
    assert out.dtype == jnp.float32
    for name, g in [("out", out), ("final_state", final)] + [("d" + n, g) for n, g in grads.items()]:
        assert bool(jnp.all(jnp.isfinite(g))), f"{name} not finite"
    # computed in float32: the same as float32 inputs holding the same (bf16-rounded) numbers
    up = {n: a.astype(jnp.float32) for n, a in x16.items()}
    out32, final32, _ = _loss_and_grads("engine", chunk, True)(up, None, cot)
    assert_close("out", out, out32, rtol=1e-6, atol=1e-6)
    assert_close("final_state", final, final32, rtol=1e-6, atol=1e-6)


def test_two_halves_with_states_equal_one_pass():
    T, cut = T0, 20
    x = _inputs(T)
    whole, final, _ = _loss_and_grads("engine", C0, True)(x, None, _cotangents(T))
    run = jax.jit(functools.partial(delta_rule_attention, chunk=8, output_final_state=True))
    part = lambda a, s: a[:, s]  # noqa: E731
    first, mid = run(*(part(x[n], slice(0, cut)) for n in ARGS[:5]), initial_state=x["initial_state"])
    second, end = run(*(part(x[n], slice(cut, T)) for n in ARGS[:5]), initial_state=mid)
    assert_close("out", jnp.concatenate([first, second], axis=1), whole)
    assert_close("final_state", end, final)


def test_iterated_step_equals_forward():
    T = T0
    x = _inputs(T)
    out, final, _ = _loss_and_grads("engine", C0, True)(x, None, _cotangents(T))
    step = jax.jit(delta_rule_step)
    state, outs = x["initial_state"], []
    for t in range(T):
        o, state = step(*(x[n][:, t] for n in ARGS[:5]), state)
        outs.append(o)
    assert_close("out", jnp.stack(outs, axis=1), out)
    assert_close("final_state", state, final)


def test_no_t_by_t_intermediate_forward_or_backward():
    T, chunk, D = 1024, 64, 16
    q = k = v = jax.ShapeDtypeStruct((1, T, 1, D), jnp.float32)  # tracing only: shapes suffice
    beta = log_decay = jax.ShapeDtypeStruct((1, T, 1), jnp.float32)

    def loss(q, k, v, beta, log_decay):
        return jnp.sum(delta_rule_attention(q, k, v, beta, log_decay, chunk=chunk))

    biggest = max_intermediate_elems(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), q, k, v, beta, log_decay)
    # the largest arrays are the per-chunk C x C blocks, (T / C) * C * C = T * C elements
    assert biggest <= T * chunk, f"largest intermediate {biggest} elements, T*C = {T * chunk}, T*T = {T * T}"


def test_bad_inputs_are_refused_clearly():
    x = _inputs(T0)
    args = [x[n] for n in ARGS[:5]]
    with pytest.raises(ValueError, match="beta must have shape"):
        delta_rule_attention(args[0], args[1], args[2], args[3][..., :1], args[4])
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        delta_rule_attention(*args, chunk=0)
    with pytest.raises(TypeError, match="kv_mask must be bool"):
        delta_rule_attention(*args, kv_mask=jnp.ones((B, T0), jnp.int32))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        delta_rule_attention(*args, initial_state=jnp.zeros((B, H, DV, DK)))
