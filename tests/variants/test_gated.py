"""retnet, gla and mamba2 against their papers' equations, forward and backward (by name).

Each reference below is written from the paper's formula (retnet's parallel form with
D_nm = gamma^(n-m), GLA's gate through the quadratic form, SSD's recurrence token by token);
the variants run the chunked engine (chunk 8, so several chunks and a ragged last one).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import efficient_attn as ea
from efficient_attn.ops.reference.gated_linear import gated_linear_quadratic
from efficient_attn.variants import gated  # noqa: F401  (registers retnet, gla, mamba2)

B, T, H, D = 2, 19, 2, 8
FWD = dict(rtol=1e-5, atol=1e-5)
BWD = dict(rtol=1e-4, atol=1e-4)
CAUSAL = ea.Mask(causal=True)


def assert_close(name, got, want, rtol, atol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


def _qkv(seed=0, T=T):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32) for _ in range(3))


def _kv_mask(T=T):
    m = np.random.default_rng(1).random((B, T)) > 0.3
    m[1, :2] = False
    return jnp.asarray(m)


def _build(name, **config):
    return ea.build(name, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(0), chunk_size=8, **config)


def _layer_norm(x, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _compare(module, reference, mask, seed=0):
    """The module and ``reference(params, q, k, v)`` agree: output, dq, dk, dv and every parameter
    gradient (d<param name>), for the loss sum(out * w) with a fixed random w."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    w = jnp.asarray(np.random.default_rng(seed + 9).standard_normal((B, T, H, D)), jnp.float32)

    def ours(p, q, k, v):
        return nnx.merge(graphdef, p, rest, copy=True)(q, k, v, mask=mask)

    def theirs(p, q, k, v):
        return reference({name: p[name][...] for name in p}, q, k, v)

    q, k, v = _qkv(seed)
    results = []
    for fn in (ours, theirs):
        loss = lambda *a, fn=fn: jnp.sum(fn(*a) * w)  # noqa: E731
        out = jax.jit(fn)(params, q, k, v)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(params, q, k, v)
        named = dict(zip(("dq", "dk", "dv"), grads[1:]))
        named.update({f"d{name}": grads[0][name][...] for name in grads[0]})
        results.append((out, named))
    (o1, g1), (o2, g2) = results
    assert_close("out", o1, o2, **FWD)
    assert set(g1) == set(g2)
    for name in g2:
        assert_close(name, g1[name], g2[name], **BWD)


# ---------------------------------------------------------------------------------- retnet


def test_retnet_decay_schedule():
    H_many = 40
    gamma = np.exp(gated.retnet_log_decays(H_many))
    np.testing.assert_allclose(gamma, 1.0 - 2.0 ** (-5.0 - np.arange(H_many)), rtol=1e-15, atol=0)
    assert np.all(gated.retnet_log_decays(H_many).astype(np.float32) < 0), "a decay rounded to exactly 1"


def _retnet_parallel(params, q, k, v, eps=1e-6):
    """Sun et al. 2023, eq. (5): Retention(X) = (Q K^T (.) D) V, D_nm = gamma^(n-m) for n >= m; GroupNorm per head."""
    n, m = np.arange(T)[:, None], np.arange(T)[None, :]
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(H))
    decay = np.where(n >= m, gamma[:, None, None] ** np.maximum(n - m, 0), 0.0).astype(np.float32)  # [H, T, T]
    scores = jnp.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(D) * decay
    return _layer_norm(jnp.einsum("bhnm,bmhe->bnhe", scores, v), eps)


def test_retnet_equals_the_parallel_form():
    _compare(_build("retnet"), _retnet_parallel, CAUSAL)


def test_retnet_padding_is_invisible():
    """Masked positions are identity steps: the real tokens' outputs equal the compacted sequence's."""
    module = _build("retnet", group_norm=False)
    q, k, v = _qkv(2)
    mask = _kv_mask()
    out = module(q, k, v, mask=ea.Mask(causal=True, kv_mask=mask))
    for b in range(B):
        keep = np.flatnonzero(np.asarray(mask[b]))
        alone = module(*(x[b : b + 1, keep] for x in (q, k, v)), mask=CAUSAL)
        assert_close(f"out[batch {b}]", out[b, keep], alone[0], **FWD)


# ---------------------------------------------------------------------------------- gla


def _gla_reference(params, q, k, v, mask=None, tau=16.0, eps=1e-6, input_norm=True):
    """Yang et al. 2024: alpha_t = sigmoid(x_t W1 W2 + b)^(1/tau) with x_t = rms(k_t) (or k_t);
    o_t = q_t^T S_t / sqrt(d); LN per head."""
    kv_mask = None if mask is None else mask
    if kv_mask is not None:
        k = jnp.where(kv_mask[:, :, None, None], k, 0.0)
    x = k / jnp.sqrt(jnp.mean(k * k, axis=-1, keepdims=True) + eps) if input_norm else k  # rms(k)
    z = jnp.einsum("bthd,hdr,hre->bthe", x, params["gate_down"], params["gate_up"]) + params["gate_bias"]
    log_alpha = jnp.log(jax.nn.sigmoid(z) ** (1.0 / tau))
    return _layer_norm(gated_linear_quadratic(q, k, v, log_alpha, kv_mask=kv_mask), eps)


@pytest.mark.parametrize("input_norm", [True, False])
def test_gla_equals_its_gated_form(input_norm):
    mask = _kv_mask()
    _compare(_build("gla", gate_input_norm=input_norm),
             lambda p, q, k, v: _gla_reference(p, q, k, v, mask, input_norm=input_norm),
             ea.Mask(causal=True, kv_mask=mask))


def test_gla_gate_ignores_the_key_scale():
    """With the RMS-normalised gate input, scaling a key changes its write, not its forgetting."""
    k = _qkv()[1]
    module = _build("gla")
    assert_close("log alpha(3 k)", module.log_gate(3.0 * k), module.log_gate(k), **FWD)
    raw = _build("gla", gate_input_norm=False)
    assert not np.allclose(np.asarray(raw.log_gate(3.0 * k)), np.asarray(raw.log_gate(k)), atol=1e-3)


def test_gla_gate_shapes_and_range():
    module = _build("gla")
    assert module.gate_down[...].shape == (H, D, 16) and module.gate_up[...].shape == (H, 16, D)
    log_alpha = module.log_gate(_qkv()[1])
    assert log_alpha.shape == (B, T, H, D)
    alpha = np.exp(np.asarray(log_alpha))
    assert np.all((alpha > 0) & (alpha < 1))
    # the temperature is a power: alpha(tau=1) = sigmoid(z) = alpha(tau=16)^16, same parameters
    sharp = _build("gla", gate_temperature=1.0).log_gate(_qkv()[1])
    assert_close("log alpha at tau=1", sharp, 16.0 * log_alpha, **FWD)


# ---------------------------------------------------------------------------------- mamba2


def _ssd_recurrence(params, q, k, v, mask=None):
    """Dao & Gu 2024: h_t = exp(-dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = h_t^T C_t + D x_t (C=q, B=k, X=v)."""
    A = jnp.exp(params["A_log"])
    real = jnp.ones((B, T), bool) if mask is None else mask
    k = jnp.where(real[:, :, None, None], k, 0.0)
    x = jnp.where(real[:, :, None, None], v, 0.0)
    dt = jax.nn.softplus(jnp.einsum("bthd,hd->bth", k, params["w_dt"]) + params["dt_bias"])

    def token(h, inputs):
        c, b_, x_t, dt_t, real_t = inputs  # [B, H, D] x3, [B, H], [B]
        a = jnp.where(real_t[:, None], jnp.exp(-dt_t * A), 1.0)
        h = a[..., None, None] * h + dt_t[..., None, None] * b_[..., :, None] * x_t[..., None, :]
        return h, jnp.einsum("bhde,bhd->bhe", h, c) + params["D"][:, None] * x_t

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, x, dt, real))
    _, y = lax.scan(token, jnp.zeros((B, H, D, D)), xs)
    return jnp.moveaxis(y, 0, 1)


def test_mamba2_equals_the_ssd_recurrence():
    mask = _kv_mask()
    _compare(_build("mamba2"), lambda p, q, k, v: _ssd_recurrence(p, q, k, v, mask), ea.Mask(causal=True, kv_mask=mask))


def test_mamba2_initialisation():
    module = _build("mamba2")
    dt = np.asarray(jax.nn.softplus(module.dt_bias[...]))
    assert np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 1e-1 * (1 + 1e-5))), dt
    a = np.exp(np.asarray(module.A_log[...]))
    assert np.all((a >= 1.0 - 1e-5) & (a <= 16.0 + 1e-4)), a
    np.testing.assert_array_equal(np.asarray(module.D[...]), 1.0)
    assert not hasattr(_build("mamba2", skip=False), "D")


# ---------------------------------------------------------------------------------- all three


@pytest.mark.parametrize("name", ["retnet", "gla", "mamba2"])
def test_nan_at_masked_keys_reaches_no_gradient(name):
    """NaN keys and values at padded positions: outputs equal the clean run's, and every gradient
    (inputs and parameters) is finite (the gates are computed from keys zeroed first)."""
    module = _build(name)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    q, k, v = _qkv(3)
    mask = _kv_mask()
    bad = ~np.asarray(mask)
    kp, vp = np.array(k), np.array(v)
    kp[bad], vp[bad] = np.nan, np.nan
    padded = ea.Mask(causal=True, kv_mask=mask)
    f = jax.jit(lambda p, q, k, v: nnx.merge(graphdef, p, rest, copy=True)(q, k, v, mask=padded))
    assert_close("out", f(params, q, kp, vp), f(params, q, k, v), **FWD)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2, 3)))(params, q, kp, vp)
    for arg, g in zip(("params", "dq", "dk", "dv"), grads):
        for leaf in jax.tree.leaves(g):
            assert np.all(np.isfinite(np.asarray(leaf))), f"{name}: non-finite {arg} gradient"


@pytest.mark.parametrize("name", ["retnet", "gla", "mamba2"])
def test_bidirectional_is_refused(name):
    q, k, v = _qkv()
    with pytest.raises(ea.CapabilityError, match=r"Mask\(causal=True\)"):
        _build(name)(q, k, v)
    assert not ea.get_spec(name).capabilities.bidirectional


@pytest.mark.parametrize(
    "name,field,value",
    [
        ("retnet", "chunk_size", 0),
        ("retnet", "norm_eps", 0.0),
        ("gla", "gate_rank", 0),
        ("gla", "gate_temperature", -1.0),
        ("gla", "gate_input_norm", 1),
        ("mamba2", "dt_min", 0.0),
        ("mamba2", "dt_max", 1e-4),
        ("mamba2", "skip", 1),
    ],
)
def test_bad_hyperparameters_are_refused(name, field, value):
    with pytest.raises(ValueError, match=field):
        ea.build(name, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(0), **{field: value})


@pytest.mark.parametrize("name", ["retnet", "gla", "mamba2"])
def test_bfloat16_runs_finite(name):
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv())
    out = _build(name)(q, k, v, mask=CAUSAL)
    assert out.dtype == jnp.bfloat16 and out.shape == (B, T, H, D)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))


def test_gate_ablation_plugin_registers_its_variants():
    """experiments/plugins/gate_ablations.py (the NOTES' ablations) loads and builds what it says."""
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "experiments" / "plugins" / "gate_ablations.py"
    names = ("gla_key_gate", "gla_key_gate_tau64", "mamba2_narrow_init", "mamba2_rms_dt")
    module = ea.registry.load_plugin(path)
    try:
        assert ea.get_spec("gla_key_gate").config().gate_input_norm is False
        assert ea.get_spec("gla_key_gate_tau64").config().gate_temperature == 64.0
        narrow = _build("mamba2_narrow_init")
        dt = np.asarray(jax.nn.softplus(narrow.dt_bias[...]))
        assert np.all(dt <= 1e-2 * (1 + 1e-5)) and np.all(np.exp(np.asarray(narrow.A_log[...])) <= 2.0 + 1e-5)
        k = _qkv()[1]
        rms_dt = _build("mamba2_rms_dt")
        assert_close("dt(3 k)", rms_dt.step_sizes(3.0 * k), rms_dt.step_sizes(k), **FWD)
    finally:
        for name in names:
            ea.registry.unregister(name)
        sys.modules.pop(module.__name__, None)
