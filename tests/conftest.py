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
    tiered(cases, ci=)             parametrize cases: the first ``ci`` in `make test` (CI), the
                                   rest marked ``slow`` (`make test-slow`, `make test-all`)

Compilation: the suite's shapes are tiny, so XLA compile time is most of its run time. The
LLVM backend is run at optimisation level 0 here (``TEST_XLA_FLAGS``, appended to any
XLA_FLAGS already set, e.g. a device count): 1.4-2x less compile time, measured on the 2-core
CPU; and XLA:CPU's older loop emitters generate the fusions instead of its MLIR fusion
emitters: another 1.9x less (deltanet, blockwise, reformer, bigbird, gla and performer
forward + backward at T = 48: 8.2 s -> 4.4 s of compiling). Both change only the generated
machine code, not the HLO the tests inspect (fusion decisions, FLOP counts, jaxprs); compiled
temp memory moves by a few hundred bytes in 10^7 (reformer, bigbird, local fwd+bwd at 8K), far
inside every memory check's tolerance, and every numerical check has a tolerance.
``EA_TEST_FULL_OPT=1`` keeps XLA's defaults.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false")
if not os.environ.get("EA_TEST_FULL_OPT") and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # before jax creates its CPU backend (at the first computation, after this import)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

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


def forbid(monkeypatch, *targets: tuple[object, str]) -> None:
    """Make each ``(module, function name)`` of ``targets`` fail the test when called: a rerun
    or a report-only run over stored rows must measure (or train) nothing."""

    def fail(*args, **kwargs):
        pytest.fail("measured although every row was stored")

    for module, name in targets:
        monkeypatch.setattr(module, name, fail)


def tiered(cases, *, ci: int) -> list:
    """``cases`` for ``pytest.mark.parametrize``: the first ``ci`` run in CI (`make test`), the
    others are marked ``slow`` and run by `make test-slow` / `make test-all`. Order the cases so
    that the first ``ci`` already reach every code path (causal and not, masks, cross lengths);
    the rest are further shapes and blockings of the same paths."""
    out = []
    for i, case in enumerate(cases):
        marks = [] if i < ci else [pytest.mark.slow]
        if isinstance(case, type(pytest.param())):
            out.append(pytest.param(*case.values, marks=list(case.marks) + marks, id=case.id))
        else:
            out.append(pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=marks))
    return out


@pytest.hookimpl(wrapper=True)  # around xdist's own hook, which reads the marks and renames node ids
def pytest_collection_modifyitems(config, items):
    """One ``xdist_group`` per variant (``make test`` runs ``--dist loadgroup``).

    The per-variant work of the conformance suite (building the module, compiling its forward
    and backward at the suite's shapes: ``harness.jitted`` and the files' ``lru_cache``d
    programs) is cached per process; grouped, a variant is compiled in one worker, not in both.
    """
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if isinstance(params.get("variant"), str):
            item.add_marker(pytest.mark.xdist_group(f"variant-{params['variant']}"))
    result = yield
    # A grouped item's node id ends in "@<group>" once xdist has read the mark; without it,
    # loadgroup spreads a variant over both workers and every compile is paid twice (pytest 9
    # with pytest-xdist 3.8 did this silently: pyproject pins pytest 8).
    if getattr(config.option, "loadgroup", False):
        lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if lost:
            raise pytest.UsageError(f"--dist loadgroup did not group {len(lost)} tests (e.g. {lost[0]}): "
                                    "pytest-xdist no longer renames node ids with this pytest; see pyproject's pin")
    return result
