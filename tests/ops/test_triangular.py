"""The matmul-only unit lower triangular solve against row-by-row forward substitution and
float64 numpy, forward and backward (the gradient of lhs and of rhs by name)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn.ops.triangular import LEAF, solve_unit_lower, solve_unit_lower_reference


def _system(batch, c, w, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    lower = np.tril(rng.standard_normal((*batch, c, c)) * scale, -1)
    upper_garbage = np.triu(rng.standard_normal((*batch, c, c)) * 5.0)  # never read
    lhs = lower + upper_garbage
    rhs = rng.standard_normal((*batch, c, w))
    return lhs, rhs


def _numpy_solution(lhs, rhs):
    c = lhs.shape[-1]
    unit = np.tril(lhs, -1) + np.eye(c)
    return np.linalg.solve(unit, rhs)


@pytest.mark.parametrize("c", [1, 3, LEAF, LEAF + 1, 16, 37, 64])
def test_solution_matches_float64_and_reference(c):
    lhs, rhs = _system((2, 3), c, 5, seed=c)
    want = _numpy_solution(lhs, rhs)
    got = jax.jit(solve_unit_lower)(jnp.float32(lhs), jnp.float32(rhs))
    ref = jax.jit(solve_unit_lower_reference)(jnp.float32(lhs), jnp.float32(rhs))
    np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-4, atol=1e-5, err_msg="reference vs numpy")
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5, err_msg="solve vs numpy")


@pytest.mark.parametrize("c", [LEAF - 1, 24])
def test_gradients_match_reference(c):
    lhs, rhs = _system((2,), c, 4, seed=100 + c)
    cotangent = np.random.default_rng(7).standard_normal(rhs.shape)

    def loss(fn):
        return lambda a, b: jnp.sum(fn(a, b) * cotangent)

    args = (jnp.float32(lhs), jnp.float32(rhs))
    got = jax.jit(jax.grad(loss(solve_unit_lower), argnums=(0, 1)))(*args)
    want = jax.jit(jax.grad(loss(solve_unit_lower_reference), argnums=(0, 1)))(*args)
    for name, g, w in zip(("lhs", "rhs"), got, want):
        assert np.all(np.isfinite(np.asarray(g))), f"d/d{name}: non-finite"
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5, err_msg=f"d/d{name}")
    # the diagonal and upper triangle are not read: their gradient is exactly zero
    assert np.all(np.triu(np.asarray(got[0])) == 0.0)


def test_jaxpr_has_no_custom_call():
    # the point of this module: no LAPACK custom call inside a training step
    lhs, rhs = _system((2,), 64, 8, seed=0)
    text = str(jax.make_jaxpr(jax.grad(lambda a, b: solve_unit_lower(a, b).sum(), argnums=(0, 1)))(lhs, rhs))
    assert "triangular_solve" not in text and "custom_call" not in text


@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, match",
    [((4, 3), (4, 2), "square"), ((2, 4, 4), (3, 4, 2), "batch axes"), ((4, 4), (5, 2), "batch axes")],
)
def test_bad_shapes_refused(lhs_shape, rhs_shape, match):
    with pytest.raises(ValueError, match=match):
        solve_unit_lower(jnp.zeros(lhs_shape), jnp.zeros(rhs_shape))
