"""``deltanet`` and ``gated_deltanet``: the variants equal their equations (gates from the raw
key, L2-normalised q and k, the token-by-token delta rule) forward and backward, parameters
included; masked tokens never matter; the gates start where Mamba-2 starts them; a zero decay
rate gives DeltaNet; causal only; bad configs refused."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn.ops.reference.delta_rule import delta_rule_recurrent
from efficient_attn.variants import delta  # noqa: F401  (registers deltanet, gated_deltanet)

B, T, H, D = 2, 37, 2, 8
CHUNK = 16
KINDS = ("deltanet", "gated_deltanet")


def assert_close(name, got, want, rtol=1e-4, atol=2e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


def _build(name, seed=0, **kw):
    return ea.build(name, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(seed), chunk_size=CHUNK, **kw)


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32) for _ in range(3))


def _kv_mask():
    m = np.random.default_rng(4).random((B, T)) > 0.3
    m[1, :4] = False  # the first queries of batch 1 see no real token
    return jnp.asarray(m)


def _param(params, path):
    return params[path[0]][path[1]][...]


def equations(name, params, q, k, v, kv_mask, cfg):
    """The module docstring's equations, written out, on the token-by-token reference."""
    real = kv_mask[:, :, None, None]
    k, v = jnp.where(real, k, 0.0), jnp.where(real, v, 0.0)
    logits = jnp.einsum("bthd,hd->bth", k, _param(params, ("beta", "w"))) + _param(params, ("beta", "b"))
    beta = 1.0 / (1.0 + jnp.exp(-logits))
    log_decay = None
    if name == "gated_deltanet":
        z = jnp.einsum("bthd,hd->bth", k, _param(params, ("forget", "w"))) + _param(params, ("forget", "dt_bias"))
        log_decay = -jnp.exp(_param(params, ("forget", "A_log"))) * jnp.logaddexp(0.0, z)
    unit = lambda x: x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + cfg.norm_eps)  # noqa: E731
    return delta_rule_recurrent(unit(q), unit(k), v, beta, log_decay, kv_mask=kv_mask, scale=cfg.scale)


@functools.lru_cache(maxsize=None)
def _grad_fns(name):
    """(variant, equations): jit(value_and_grad) of <out, w> over (params, q, k, v)."""
    module = _build(name)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def variant(params, q, k, v, kv_mask):
        m = nnx.merge(graphdef, params, rest, copy=True)
        return m(q, k, v, mask=ea.Mask(causal=True, kv_mask=kv_mask))

    def formula(params, q, k, v, kv_mask):
        return equations(name, params, q, k, v, kv_mask, module.config)

    def with_grads(fn):
        def loss(params, q, k, v, kv_mask, w):
            out = fn(params, q, k, v, kv_mask)
            return jnp.sum(out * w), out

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))

        def run(q, k, v, kv_mask, w):
            (_, out), grads = grad(params, q, k, v, kv_mask, w)
            return out, grads

        return run

    return with_grads(variant), with_grads(formula)


def _named_grads(grads):
    (dparams, dq, dk, dv) = grads
    out = {"dq": dq, "dk": dk, "dv": dv}
    for path, leaf in jax.tree_util.tree_leaves_with_path(dparams):
        out["d" + jax.tree_util.keystr(path)] = leaf
    return out


@pytest.mark.parametrize("name", KINDS)
def test_variant_equals_its_equations_forward_and_backward(name):
    q, k, v = _qkv()
    w = jnp.asarray(np.random.default_rng(9).standard_normal((B, T, H, D)), jnp.float32)
    variant, formula = _grad_fns(name)
    out, grads = variant(q, k, v, _kv_mask(), w)
    want_out, want_grads = formula(q, k, v, _kv_mask(), w)
    assert_close("out", out, want_out)
    got, want = _named_grads(grads), _named_grads(want_grads)
    assert set(got) == set(want) and len(got) == 3 + (5 if name == "gated_deltanet" else 2)
    for n in want:
        assert_close(n, got[n], want[n])
    np.testing.assert_array_equal(np.asarray(out[1, :4]), 0.0)  # saw no real key: zeros


@pytest.mark.parametrize("name", KINDS)
def test_masked_tokens_never_matter_even_nan(name):
    q, k, v = _qkv()
    m = _kv_mask()
    w = jnp.ones((B, T, H, D))
    variant, _ = _grad_fns(name)
    out, grads = variant(q, k, v, m, w)
    hid = ~m[:, :, None, None]
    out2, grads2 = variant(q, jnp.where(hid, jnp.nan, k), jnp.where(hid, jnp.inf, v), m, w)
    assert_close("out", out2, out, rtol=0, atol=0)
    got, want = _named_grads(grads2), _named_grads(grads)
    for n in want:
        assert_close(n, got[n], want[n], rtol=0, atol=0)


def test_gates_start_where_mamba2_starts_them():
    cfg = delta.GatedDeltaNetConfig()
    m = ea.build("gated_deltanet", num_heads=16, head_dim=D, max_len=64, rngs=nnx.Rngs(3))
    a = np.exp(np.asarray(m.forget.A_log[...]))
    dt = np.logaddexp(0.0, np.asarray(m.forget.dt_bias[...], np.float64))
    assert np.all((a >= cfg.a_min) & (a <= cfg.a_max)) and a.std() > 1, a
    assert np.all((dt >= cfg.dt_min * (1 - 1e-5)) & (dt <= cfg.dt_max * (1 + 1e-5))), dt
    k = jnp.asarray(np.random.default_rng(0).standard_normal((1, 9, 16, D)), jnp.float32)
    beta, log_decay = m.gates(k)
    assert bool(jnp.all((beta > 0) & (beta < 1))) and float(beta.std()) > 0.05
    assert bool(jnp.all(log_decay < 0))


def test_gated_with_zero_decay_rate_is_deltanet():
    q, k, v = _qkv(seed=2)
    gated, plain = _build("gated_deltanet", seed=1), _build("deltanet", seed=5)
    plain.beta.w[...] = gated.beta.w[...]
    plain.beta.b[...] = gated.beta.b[...] + 0.3  # exercise the bias too
    gated.beta.b[...] = plain.beta.b[...]
    gated.forget.A_log[...] = jnp.full((H,), -jnp.inf)  # exp(A_log) = 0: alpha = 1
    mask = ea.Mask(causal=True)
    got = nnx.jit(lambda m, q, k, v: m(q, k, v, mask=mask))(gated, q, k, v)
    want = nnx.jit(lambda m, q, k, v: m(q, k, v, mask=mask))(plain, q, k, v)
    assert_close("out", got, want, rtol=1e-6, atol=1e-6)


def test_bfloat16_inputs_give_bfloat16_computed_in_float32():
    m = _build("gated_deltanet")
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv())
    mask = ea.Mask(causal=True)
    f = nnx.jit(lambda m, q, k, v: m(q, k, v, mask=mask))
    out = f(m, q, k, v)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
    up = f(m, *(x.astype(jnp.float32) for x in (q, k, v)))
    assert_close("out", out.astype(jnp.float32), up.astype(jnp.bfloat16).astype(jnp.float32), rtol=0, atol=0)


@pytest.mark.parametrize("name", KINDS)
def test_causal_only_and_self_attention_only(name):
    m = _build(name)
    q, k, v = _qkv()
    with pytest.raises(ea.CapabilityError, match=r"pass Mask\(causal=True\)"):
        m(q, k, v)
    with pytest.raises(ValueError, match="cross"):
        m(q, k[:, :20], v[:, :20], mask=ea.Mask(causal=True))
    caps = ea.get_spec(name).capabilities
    assert caps.causal and not caps.bidirectional and caps.kv_mask and not caps.exact


@pytest.mark.parametrize(
    "name, bad, field",
    [
        ("deltanet", {"chunk_size": 0}, "chunk_size"),
        ("deltanet", {"scale": -1.0}, "scale"),
        ("gated_deltanet", {"norm_eps": 0.0}, "norm_eps"),
        ("gated_deltanet", {"a_min": 0.0}, "a_min"),
        ("gated_deltanet", {"dt_min": 0.5, "dt_max": 0.1}, "dt_min"),
    ],
)
def test_bad_configs_are_refused(name, bad, field):
    with pytest.raises(ValueError, match=f"{name}.*{field}"):
        ea.build(name, num_heads=H, head_dim=D, max_len=64, rngs=nnx.Rngs(0), **bad)
