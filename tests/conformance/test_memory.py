"""Complexity is real: no subquadratic-memory variant builds an N x N array (read off the jaxpr).

How compiled memory grows with N is measured where a quadratic term shows, 8K to 32K (64K
in the slow tier), by test_scale.py.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import efficient_attn as ea
from conformance.harness import caps, pure

H, D = 2, 16


def _claims_subquadratic(memory: str) -> bool:
    m = memory.replace(" ", "")
    return not any(s in m for s in ("N^2", "N²", "T*S", "TS", "N*N"))


def test_no_dense_n_by_n_intermediate(variant):
    """A subquadratic variant never builds an N x N array, forward or backward (read off the jaxpr)."""
    from jaxpr_tools import max_intermediate_elems

    c = caps(variant)
    if not _claims_subquadratic(c.memory):
        pytest.skip(f"{variant} claims memory {c.memory}")
    n = 2048
    module = ea.build(variant, num_heads=1, head_dim=D, max_len=n, rngs=nnx.Rngs(0))
    f = pure(module)
    x = jax.ShapeDtypeStruct((1, n, 1, D), jnp.float32)
    biggest = max_intermediate_elems(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)), x, x, x)
    assert biggest < n * n, f"{variant}: an intermediate of {biggest} elements >= N^2 = {n * n} at N={n}"
