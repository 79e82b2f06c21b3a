"""Shape/dtype contract, jit, vmap, grad, dtypes and determinism, for every registered variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from conformance.harness import B, D, H, as_claimed, built, jitted, pure, qkv

T = 37


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_shape_dtype_finite(variant, dtype):
    q, k, v = qkv(T, dtype=dtype)
    out = jitted(variant)(q, k, v)
    assert out.shape == (B, T, H, D)
    assert out.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def test_bf16_close_to_f32(variant):
    q, k, v = qkv(T)
    f = jitted(variant)
    ref = f(q, k, v)
    low = f(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)).astype(jnp.float32)
    err = float(jnp.linalg.norm(low - ref) / (jnp.linalg.norm(ref) + 1e-6))
    assert err < 0.1, f"{variant}: bfloat16 relative error {err:.3f} against float32"


def test_jit_equals_eager(variant):
    q, k, v = qkv(T)
    f = pure(built(variant))
    np.testing.assert_allclose(jitted(variant)(q, k, v), f(q, k, v), rtol=2e-4, atol=2e-5)


def test_vmap(variant):
    q, k, v = qkv(T, batch=3)
    f = pure(built(variant))
    # both jitted (eager dispatch of every op costs far more than one compile on this CPU)
    stacked = jax.jit(jax.vmap(lambda a, b, c: f(a[None], b[None], c[None])[0]))(q, k, v)
    one = jax.jit(f)
    looped = jnp.concatenate([one(q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(stacked, looped, rtol=2e-4, atol=2e-5)


def test_grad_finite(variant):
    q, k, v = qkv(T)
    f = pure(built(variant))
    w = jax.random.normal(jax.random.key(7), (B, T, H, D))
    grads = jax.jit(jax.grad(lambda a, b, c: jnp.sum(f(a, b, c) * w), argnums=(0, 1, 2)))(q, k, v)
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g)))
    # something flows back to the values for every variant (the output is linear in V)
    assert float(jnp.abs(grads[2]).sum()) > 0


def test_param_grad_finite(variant):
    from flax import nnx

    module = built(variant)
    params = nnx.state(module, nnx.Param)
    if not jax.tree_util.tree_leaves(params):
        pytest.skip(f"{variant} has no parameters")
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    q, k, v = qkv(T)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(q, k, v, mask=as_claimed(variant, None)) ** 2)

    g = jax.jit(jax.grad(loss))(params)
    for leaf in jax.tree_util.tree_leaves(g):
        assert bool(jnp.all(jnp.isfinite(leaf)))


def test_deterministic(variant):
    from flax import nnx

    q, k, v = qkv(T)
    graphdef, first = nnx.split(ea.build(variant, num_heads=H, head_dim=D, max_len=128, rngs=nnx.Rngs(3)))
    _, second = nnx.split(ea.build(variant, num_heads=H, head_dim=D, max_len=128, rngs=nnx.Rngs(3)))
    run = jax.jit(lambda state, q, k, v: nnx.merge(graphdef, state, copy=True)(q, k, v, mask=as_claimed(variant, None)))
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):  # an RNG stream the module keeps
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same rngs, same parameters
    np.testing.assert_array_equal(np.asarray(run(first, q, k, v)), np.asarray(run(second, q, k, v)))
