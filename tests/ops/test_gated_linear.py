"""The chunked gated linear-attention engine against its references, forward and backward.

References (efficient_attn/ops/reference/gated_linear.py): the token-by-token recurrence and
the quadratic form with an explicit decay matrix. Every gradient is compared by name (dq, dk,
dv, dlog_decay, dstate0). Engine and references are jitted once per configuration.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from efficient_attn.ops.gated_linear import gated_linear_attention, gated_linear_step, segment_sums
from efficient_attn.ops.reference.gated_linear import gated_linear_quadratic, gated_linear_recurrent
from conftest import tiered
from jaxpr_tools import max_intermediate_elems

B, H, DK, DV = 2, 2, 8, 5
FWD = dict(rtol=1e-5, atol=1e-5)
BWD = dict(rtol=1e-4, atol=1e-4)

engine = jax.jit(gated_linear_attention, static_argnames=("causal", "chunk", "output_final_state", "scale"))
recurrent = jax.jit(gated_linear_recurrent, static_argnames=("scale",))
quadratic = jax.jit(gated_linear_quadratic, static_argnames=("scale",))


def assert_close(name, got, want, rtol, atol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


def _inputs(T, diagonal, seed=0, gate_mean=2.0):
    """q, k, v, log decays (mostly decays in (0.5, 1)) and an initial state; numpy draws (no compiles)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q, k, v = normal(B, T, H, DK), normal(B, T, H, DK), normal(B, T, H, DV)
    g = jax.nn.log_sigmoid(gate_mean + normal(*((B, T, H, DK) if diagonal else (B, T, H))))
    return q, k, v, g, normal(B, H, DK, DV)


def _kv_mask(T, seed=1):
    m = np.random.default_rng(seed).random((B, T)) > 0.3
    m[1, :3] = False
    return jnp.asarray(m)


def _grads(fn, q, k, v, g, s0, seed=7):
    """(out, {name: gradient}) of sum(out * w) for a fixed random cotangent w; one compile."""
    shape = jax.eval_shape(fn, q, k, v, g, s0).shape
    w = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)

    def loss(*a):
        out = fn(*a)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(q, k, v, g, s0)
    return out, dict(zip(("dq", "dk", "dv", "dlog_decay", "dstate0"), grads))


def _compare(got, want):
    (o1, g1), (o2, g2) = got, want
    assert_close("out", o1, o2, **FWD)
    for name in g2:
        assert_close(name, g1[name], g2[name], **BWD)


@pytest.mark.parametrize("diagonal", [False, True], ids=["scalar", "diagonal"])
@pytest.mark.parametrize("T,chunk,masked", tiered([(65, 16, True), (7, 1, True), (1, 64, False), (37, 8, False)], ci=2))
def test_chunked_equals_recurrence(T, chunk, masked, diagonal):
    q, k, v, g, s0 = _inputs(T, diagonal)
    kv_mask = _kv_mask(T) if masked else None
    got = _grads(lambda *a: engine(*a[:4], kv_mask=kv_mask, chunk=chunk, initial_state=a[4]), q, k, v, g, s0)
    want = _grads(lambda *a: recurrent(*a[:4], kv_mask=kv_mask, initial_state=a[4])[0], q, k, v, g, s0)
    _compare(got, want)


@pytest.mark.parametrize("diagonal", [False, True], ids=["scalar", "diagonal"])
def test_quadratic_equals_recurrence(diagonal):
    q, k, v, g, s0 = _inputs(37, diagonal, seed=3)
    kv_mask = _kv_mask(37)
    zero = jnp.zeros_like(s0)
    got = _grads(lambda *a: quadratic(*a[:4], kv_mask=kv_mask), q, k, v, g, zero)
    want = _grads(lambda *a: recurrent(*a[:4], kv_mask=kv_mask)[0], q, k, v, g, zero)
    got[1].pop("dstate0"), want[1].pop("dstate0")
    _compare(got, want)


def test_segment_sums():
    g = jnp.asarray([-1.0, -2.0, -4.0])
    s = np.asarray(segment_sums(g))
    want = np.array([[0.0, -np.inf, -np.inf], [-2.0, 0.0, -np.inf], [-6.0, -4.0, 0.0]])
    np.testing.assert_array_equal(s, want)
    gd = jnp.stack([g, 2 * g], axis=-1)  # [C, D]: the key axis is inserted after the query axis
    doubled = np.where(np.isinf(want), want, 2 * want)
    np.testing.assert_array_equal(np.asarray(segment_sums(gd, axis=-2))[..., 1], doubled)


@pytest.mark.parametrize("diagonal", [False, True], ids=["scalar", "diagonal"])
def test_no_decay_is_causal_linear_attention(diagonal):
    q, k, v, g, _ = _inputs(37, diagonal)
    g = jnp.zeros_like(g)
    scores = jnp.einsum("bihd,bjhd->bhij", q, k) * DK**-0.5
    want = jnp.einsum("bhij,bjhe->bihe", jnp.where(jnp.tril(jnp.ones((37, 37), bool)), scores, 0.0), v)
    assert_close("out", engine(q, k, v, g, chunk=16), want, **FWD)


@pytest.mark.parametrize("diagonal", [False, True], ids=["scalar", "diagonal"])
def test_decay_zero_sees_only_the_current_token(diagonal):
    """A decay of exactly 0 (log_decay -inf, batch 0) or underflowing (-1e4, batch 1)."""
    q, k, v, g, s0 = _inputs(37, diagonal)
    g = jnp.where((jnp.arange(B) == 0).reshape((B,) + (1,) * (g.ndim - 1)), -jnp.inf, -1e4) * jnp.ones_like(g)
    want = jnp.einsum("bthd,bthd->bth", q, k)[..., None] * DK**-0.5 * v
    fn = lambda *a: gated_linear_attention(*a[:4], chunk=16, initial_state=a[4])  # noqa: E731
    out, grads = _grads(fn, q, k, v, g, s0)
    assert_close("out", out, want, **FWD)
    for name, grad in grads.items():
        assert np.all(np.isfinite(np.asarray(grad))), f"{name}: non-finite gradient"
    assert_close("dstate0", grads["dstate0"], jnp.zeros_like(s0), **FWD)  # the initial state is forgotten


@pytest.mark.parametrize("diagonal", [False, True], ids=["scalar", "diagonal"])
def test_bfloat16_and_extreme_gates(diagonal):
    """Gates at 1 - 1e-6 and e^-30 alternate; bf16 inputs are computed in float32, so the output
    matches the float32 recurrence of the same (bf16-rounded) inputs, and every gradient is finite."""
    q, k, v, g, s0 = _inputs(65, diagonal)
    g = jnp.asarray(np.where(np.random.default_rng(5).random(g.shape) < 0.5, -1e-6, -30.0), jnp.float32)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    fn = lambda *a: engine(*a[:4], chunk=16, initial_state=a[4])  # noqa: E731
    out, grads = _grads(fn, q, k, v, g, s0)
    assert out.dtype == jnp.float32
    want = recurrent(*(x.astype(jnp.float32) for x in (q, k, v)), g, initial_state=s0)[0]
    assert_close("out", out, want, rtol=1e-4, atol=1e-4)
    for name, grad in grads.items():
        assert np.all(np.isfinite(np.asarray(grad, np.float32))), f"{name}: non-finite gradient"


@pytest.mark.parametrize("diagonal", [False, True], ids=["scalar", "diagonal"])
def test_masked_positions_are_identity_steps(diagonal):
    """NaN / inf at masked keys, values and log decays change nothing: the real positions' outputs
    equal those of the sequence with the masked positions deleted; gradients stay finite."""
    T = 37
    q, k, v, g, _ = (np.asarray(x) for x in _inputs(T, diagonal))
    mask = np.asarray(_kv_mask(T))
    bad = ~mask
    kp, vp, gp = k.copy(), v.copy(), g.copy()
    kp[bad], vp[bad], gp[bad] = np.nan, np.inf, np.nan
    fn = jax.jit(lambda q, k, v, g: gated_linear_attention(q, k, v, g, kv_mask=jnp.asarray(mask), chunk=8))
    out = np.asarray(fn(q, kp, vp, gp))
    for b in range(B):
        keep = np.flatnonzero(mask[b])
        alone, _ = recurrent(*(x[b : b + 1, keep] for x in (q, k, v, g)))
        assert_close(f"out[batch {b}]", out[b, keep], alone[0], **FWD)
    # a query with no real key at or before it (batch 1, positions 0..2) gets exactly zero
    np.testing.assert_array_equal(out[1, :3], 0.0)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2, 3)))(q, kp, vp, gp)
    for name, grad in zip(("dq", "dk", "dv", "dlog_decay"), grads):
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)), f"{name}: NaN/inf leaked from masked positions"
        if name != "dq":
            np.testing.assert_array_equal(grad[bad], 0.0, err_msg=f"{name} at masked positions")


@pytest.mark.parametrize("diagonal", [False, True], ids=["scalar", "diagonal"])
def test_two_halves_with_state_equal_one_pass(diagonal):
    T, cut = 65, 27  # the cut is not on a chunk boundary
    q, k, v, g, s0 = _inputs(T, diagonal)
    kv_mask = _kv_mask(T)
    run = functools.partial(engine, chunk=64, output_final_state=True)  # 65 = one full chunk + 1
    whole, final = run(q, k, v, g, kv_mask=kv_mask, initial_state=s0)
    halves = [tuple(np.asarray(x)[:, part] for x in (q, k, v, g, kv_mask)) for part in (slice(0, cut), slice(cut, T))]
    first, mid = run(*halves[0][:4], kv_mask=halves[0][4], initial_state=s0)
    second, end = run(*halves[1][:4], kv_mask=halves[1][4], initial_state=mid)
    assert_close("out", jnp.concatenate([first, second], axis=1), whole, **FWD)
    assert_close("final_state", end, final, **FWD)
    want_state = recurrent(q, k, v, g, kv_mask=kv_mask, initial_state=s0)[1]
    assert_close("final_state vs recurrence", final, want_state, **FWD)


@pytest.mark.parametrize("diagonal", [False, True], ids=["scalar", "diagonal"])
def test_step_iterated_equals_forward(diagonal):
    T = 37
    q, k, v, g, s0 = _inputs(T, diagonal)
    kv_mask = _kv_mask(T)

    @jax.jit
    def decode(q, k, v, g, m, s0):
        def one(state, x):
            o, state = gated_linear_step(*x[:4], state, kv_mask_t=x[4])
            return state, o

        xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, m))
        state, out = lax.scan(one, s0, xs)
        return jnp.moveaxis(out, 0, 1), state

    out, state = decode(q, k, v, g, kv_mask, s0)
    want, want_state = engine(q, k, v, g, kv_mask=kv_mask, chunk=16, initial_state=s0, output_final_state=True)
    assert_close("out", out, want, **FWD)
    assert_close("state", state, want_state, **FWD)


@pytest.mark.parametrize("diagonal", [False, True], ids=["scalar", "diagonal"])
def test_no_t_by_t_intermediate(diagonal):
    T, D = 1024, 16
    x = jax.ShapeDtypeStruct((1, T, 1, D), jnp.float32)
    gs = jax.ShapeDtypeStruct((1, T, 1, D) if diagonal else (1, T, 1), jnp.float32)
    loss = lambda q, k, v, g: jnp.sum(gated_linear_attention(q, k, v, g, chunk=64))  # noqa: E731
    biggest = max_intermediate_elems(jax.grad(loss, argnums=(0, 1, 2, 3)), x, x, x, gs)
    assert biggest < T * T, f"an intermediate of {biggest} elements >= T^2 = {T * T}"


def test_bad_inputs_are_refused_clearly():
    q, k, v, g, s0 = _inputs(7, False)
    with pytest.raises(ValueError, match="causal=True"):
        gated_linear_attention(q, k, v, g, causal=False)
    with pytest.raises(ValueError, match="log_decay must be"):
        gated_linear_attention(q, k, v, g[..., None])
    with pytest.raises(ValueError, match="initial_state must be"):
        gated_linear_attention(q, k, v, g, initial_state=s0[..., :2])
    with pytest.raises(ValueError, match="chunk must be"):
        gated_linear_attention(q, k, v, g, chunk=0)
    with pytest.raises(ValueError, match="T == S"):
        gated_linear_attention(q, k[:, :5], v[:, :5], g)
