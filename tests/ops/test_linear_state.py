"""The recurrent linear-attention state against its reference and the chunked engine.

``ops.linear_state.step`` scanned over a sequence == ``linear_attention_recurrent`` (the
reference) forward and backward (dphi_q, dphi_k, dv by name), with and without FAVOR+ log
scales; ``summarise`` of a padded prompt, then steps == the causal engine over the whole
sequence; a key no query may see is never read.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import assert_close
from efficient_attn.ops import linear_state
from efficient_attn.ops.linear_attention import linear_attention
from efficient_attn.ops.reference.linear import linear_attention_recurrent

B, T, H, F, DV = 2, 13, 2, 6, 5
FWD = dict(rtol=1e-5, atol=1e-5)
BWD = dict(rtol=1e-4, atol=1e-4)


def _inputs(seed=0, log_scales=False):
    rng = np.random.default_rng(seed)
    phi_q = jnp.asarray(rng.uniform(0.1, 1.0, (B, T, H, F)), jnp.float32)
    phi_k = jnp.asarray(rng.uniform(0.1, 1.0, (B, T, H, F)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, H, DV)), jnp.float32)
    scale = jnp.asarray(rng.uniform(-30.0, 30.0, (B, T, H)), jnp.float32) if log_scales else None
    return phi_q, phi_k, v, scale


def _scanned(phi_q, phi_k, v, scale, eps, state=None):
    """``linear_state.step`` over the tokens, from ``state`` (default: empty)."""
    state = linear_state.init_state(B, H, F, DV) if state is None else state

    def one(s, xs):
        q_t, k_t, v_t, l_t = xs
        out, s = linear_state.step(q_t, k_t, v_t, s, k_log_scale_t=None if scale is None else l_t, eps=eps)
        return s, out

    l = jnp.zeros(phi_k.shape[:3]) if scale is None else scale
    tm = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
    _, out = lax.scan(one, state, (tm(phi_q), tm(phi_k), tm(v), tm(l)))
    return jnp.moveaxis(out, 0, 1)


@pytest.mark.parametrize("log_scales", [False, True], ids=["plain", "log_scales"])
def test_steps_equal_recurrent_reference_fwd_bwd(log_scales):
    phi_q, phi_k, v, scale = _inputs(log_scales=log_scales)
    eps = 0.0 if log_scales else 1e-6
    fast = lambda a, b, c: _scanned(a, b, c, scale, eps)  # noqa: E731
    slow = lambda a, b, c: linear_attention_recurrent(a, b, c, k_log_scale=scale, eps=eps)  # noqa: E731
    assert_close("out", jax.jit(fast)(phi_q, phi_k, v), slow(phi_q, phi_k, v), **FWD)
    w = jax.random.normal(jax.random.key(3), (B, T, H, DV))
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(phi_q, phi_k, v) for f in (fast, slow)]
    for name, a, b in zip(("dphi_q", "dphi_k", "dv"), *grads):
        assert_close(name, a, b, **BWD)


@pytest.mark.parametrize("log_scales", [False, True], ids=["plain", "log_scales"])
@pytest.mark.parametrize("prompt", [1, 6])
def test_summarised_prompt_then_steps_equal_engine(log_scales, prompt):
    phi_q, phi_k, v, scale = _inputs(seed=1, log_scales=log_scales)
    real = jnp.ones((B, T), bool).at[0, 0].set(False).at[1, prompt - 1].set(False)
    eps = 0.0 if log_scales else 1e-6
    want = linear_attention(phi_q, phi_k, v, causal=True, kv_mask=real, k_log_scale=scale, eps=eps, chunk_size=4)
    cut = lambda x: None if x is None else x[:, :prompt]  # noqa: E731
    s = linear_state.summarise(cut(phi_k), cut(v), kv_mask=real[:, :prompt], k_log_scale=cut(scale))
    rest = lambda x: None if x is None else x[:, prompt:]  # noqa: E731
    got = _scanned(rest(phi_q), rest(phi_k), rest(v), rest(scale), eps, state=s)
    assert_close("out after the prompt", got, want[:, prompt:], **FWD)
    assert s.kv.shape == (B, H, F, DV + 1)


def test_a_skipped_key_is_never_read():
    phi_q, phi_k, v, _ = _inputs(seed=2)
    s = linear_state.init_state(B, H, F, DV)
    poison = jnp.full((B, H, F), jnp.nan)
    s = linear_state.write(s, poison, jnp.full((B, H, DV), jnp.inf), keep_t=jnp.zeros((B,), bool))
    num, den = linear_state.read(s, phi_q[:, 0])
    assert bool(jnp.all(num == 0)) and bool(jnp.all(den == 0))
    out, s = linear_state.step(phi_q[:, 0], phi_k[:, 0], v[:, 0], s)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out, v[:, 0], rtol=1e-5, atol=1e-6)  # one key seen: its value
