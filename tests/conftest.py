"""Shared fixtures of the whole suite. The test tree mirrors the package:

    tests/ops/          the engines against their references (efficient_attn/ops/)
    tests/variants/     each family's own math (efficient_attn/variants/)
    tests/sweeps/       the experiments (efficient_attn/sweeps/)
    tests/tasks/        the generated tasks (efficient_attn/tasks/)
    tests/conformance/  every registered variant through the same contract
    tests/test_*.py     the top-level modules (core, registry, nn, train, measure, report)

Helpers shared by the test files (``from conftest import make_qkv, build, ...``):

    random_arrays(seed, *shapes)   standard normal arrays from one key split len(shapes) ways
    make_qkv(T, S, B=, H=, D=, Dv=, seed=, scale=, dtype=)   q, k, v in BTHD
    build(name, H, D, max_len=, seed=, **hp)                 ea.build with nnx.Rngs(seed)
    jit_module(module)             the module as one jitted function of (q, k, v, mask)
    assert_close(name, got, want, rtol=, atol=)   allclose that names the quantity that failed
    assert_all_close(got, want, rtol=, atol=)     the same over a dict of named arrays
    named_grads(grads)             a pytree of gradients (e.g. an nnx.State) as {path: array}
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# `from conformance.harness import ...` and `import jaxpr_tools` work from every subfolder.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def random_arrays(seed: int, *shapes, dtype=jnp.float32) -> tuple:
    """Standard normal arrays of ``shapes``, the i-th drawn from ``split(key(seed), len(shapes))[i]``."""
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return tuple(jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes))


def make_qkv(T: int, S: int | None = None, *, B: int = 2, H: int = 2, D: int = 8, Dv: int | None = None,
             seed: int = 0, scale: float = 1.0, dtype=jnp.float32) -> tuple:
    """q [B, T, H, D], k [B, S, H, D] (both times ``scale``) and v [B, S, H, Dv], standard normal."""
    S = T if S is None else S
    Dv = D if Dv is None else Dv
    q, k, v = random_arrays(seed, (B, T, H, D), (B, S, H, D), (B, S, H, Dv), dtype=dtype)
    if scale != 1.0:
        q, k = scale * q, scale * k
    return q, k, v


def build(name: str, H: int, D: int, *, max_len: int = 128, seed: int = 0, **hp):
    """A registered variant with ``num_heads=H``, ``head_dim=D`` and parameters from ``nnx.Rngs(seed)``."""
    import efficient_attn as ea  # here, not at collection: a broken variant fails its tests, not the session

    return ea.build(name, num_heads=H, head_dim=D, max_len=max_len, rngs=nnx.Rngs(seed), **hp)


def jit_module(module):
    """``module(q, k, v, mask=mask)`` as one jitted function (eager dispatch is slow on this CPU).

    The module's state is merged as a copy, so a variant that advances an RNG stream per call
    (Performer with redraw) gives the same output on every call of the jitted function.
    """
    graphdef, state = nnx.split(module)
    return jax.jit(lambda q, k, v, mask=None: nnx.merge(graphdef, state, copy=True)(q, k, v, mask=mask))


def assert_close(name: str, got, want, *, rtol: float, atol: float) -> None:
    """``np.testing.assert_allclose`` that says which quantity (``"dq"``, ``"out"``, ...) failed.

    NaN never equals NaN here, and both sides must have the same shape.
    """
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=False,
                               err_msg=f"{name} differs (rtol={rtol}, atol={atol})")


def assert_all_close(got: dict, want: dict, *, rtol: float, atol: float) -> None:
    """``assert_close`` for every name of two dicts with the same keys."""
    assert set(got) == set(want), f"different names: {sorted(got)} vs {sorted(want)}"
    for name in got:
        assert_close(name, got[name], want[name], rtol=rtol, atol=atol)


def named_grads(grads, prefix: str = "d") -> dict:
    """{"d<path>": leaf} for a pytree of gradients, e.g. {"dw_sort": ..., "db_sort": ...} of an nnx.State."""
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    out = {}
    for path, leaf in flat:
        keys = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
        keys = [x for x in keys if x not in ("value", "raw_value")]
        out[prefix + ".".join(keys)] = leaf
    return out
