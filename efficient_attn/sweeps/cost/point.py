"""One point of the cost sweep: a (variant, pass, masking, N) measured for time, memory, FLOPs.

- time: compiled once (``compile_s`` apart), warm-up, then the median and interquartile range
  of timed repeats, each inside ``jax.block_until_ready``; an adaptive repeat count;
- memory: ``compiled.memory_analysis()`` argument + output + temporary bytes (``memory_bytes``;
  ``temp_bytes`` apart) and, where the backend keeps one, the device's peak (``device_peak_bytes``);
- FLOPs: XLA's ``cost_analysis`` for loop-free programs, else a count on the jaxpr
  (``flops_source`` says which), and the fraction of this machine's matmul rate.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import efficient_attn as ea
from efficient_attn import allocator, measure, report
from efficient_attn.core import Mask
from efficient_attn.sweeps.cost.config import MiB, CostConfig

__all__ = ["row_key", "base_row", "record_memory", "record_timing", "record_error", "skip_over_time_budget",
           "measure_point"]


def row_key(kind: str, variant: str, pass_: str, causal: bool, n: int, cfg: CostConfig) -> str:
    """The RowStore key of a kernel-shaped point of ``kind`` (the sweep's "cost", the control's
    "tokens") at ``cfg``'s batch, heads, head_dim and dtype."""
    masking = "causal" if causal else "bidir"
    return report.RowStore.make_key(kind, variant, pass_, masking, n, cfg.batch, cfg.heads, cfg.head_dim, cfg.dtype)


@functools.lru_cache(maxsize=128)
def module_state(name: str, heads: int, head_dim: int, n: int, seed: int):
    """The variant's (graphdef, params, other state), built once per length for all four modes
    (building some variants takes a second: their fixed random patterns are drawn eagerly)."""
    module = ea.build(name, num_heads=heads, head_dim=head_dim, max_len=n, rngs=nnx.Rngs(seed))
    return nnx.split(module, nnx.Param, ...)


def point_function(name: str, pass_: str, causal: bool, n: int, cfg: CostConfig):
    """(fn, args): a pure function of (params, other state, q, k, v[, g]) and its arguments.

    "fwd" is the attention call; "fwd_bwd" the gradient of <out, g> with respect to the
    variant's parameters and q, k, v.
    """
    graphdef, params, rest = module_state(name, cfg.heads, cfg.head_dim, n, cfg.seed)
    mask = Mask(causal=True) if causal else None
    dtype = jnp.dtype(cfg.dtype)
    # numpy draws: jax.random would compile a sampler for every new shape (over a second on CPU)
    rng = np.random.default_rng(cfg.seed)
    shape = (cfg.batch, n, cfg.heads, cfg.head_dim)
    q, k, v, g = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype=dtype) for _ in range(4))

    def forward(params, rest, q, k, v):
        return nnx.merge(graphdef, params, rest)(q, k, v, mask=mask)

    if pass_ == "fwd":
        return forward, (params, rest, q, k, v)

    def loss(params, q, k, v, rest, g):
        out = forward(params, rest, q, k, v)
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2, 3)), (params, q, k, v, rest, g)


def base_row(name: str, pass_: str, causal: bool, n: int, cfg: CostConfig) -> dict[str, Any]:
    """The row of a point before it is measured: what it is, under which budgets, no figures."""
    spec = ea.get_spec(name)
    return {
        "variant": name,
        "n": n,
        "pass": pass_,
        "causal": causal,
        "status": "ok",
        "reason": "",
        "family": spec.family,
        "exact": spec.capabilities.exact,
        "claimed_time": spec.capabilities.time,
        "claimed_memory": spec.capabilities.memory,
        "batch": cfg.batch,
        "heads": cfg.heads,
        "head_dim": cfg.head_dim,
        "dtype": cfg.dtype,
        "allocator": allocator.describe(),
        "time_median_s": None,
        "time_spread": None,
        "time_spread_kind": None,
        "time_min_s": None,
        "time_max_s": None,
        "repeats": 0,
        "compile_s": None,
        "memory_bytes": None,
        "temp_bytes": None,
        "argument_bytes": None,
        "output_bytes": None,
        "xla_peak_bytes": None,
        "device_peak_bytes": None,
        "flops": None,
        "flops_source": None,
        "flops_xla": None,
        "flops_jaxpr": None,
        "gflops_per_s": None,
        "matmul_gflops": None,
        "matmul_fraction": None,
        "max_call_s": cfg.max_call_s,
        "max_compile_s": cfg.max_compile_s,
        "memory_budget_bytes": cfg.memory_budget_bytes,
    }


def record_memory(row: dict, compiled, budget_bytes: int, what: str) -> bool:
    """Put the compiled program's memory into ``row``; mark it skipped (True) when over budget."""
    mem = measure.compiled_memory(compiled)
    if mem is None:
        return False
    row.update(memory_bytes=mem.total_bytes, temp_bytes=mem.temp_bytes, argument_bytes=mem.argument_bytes,
               output_bytes=mem.output_bytes, xla_peak_bytes=mem.xla_peak_bytes)
    if mem.total_bytes <= budget_bytes:
        return False
    row.update(status="skipped", reason=(
        f"memory budget: {what} needs {mem.total_bytes / MiB:.0f} MiB > "
        f"memory_budget_bytes={budget_bytes / MiB:.0f} MiB (memory_analysis, not run)"))
    return True


def skip_over_time_budget(row: dict, predicted_s: tuple[float, float] | None, from_n: int | None, limit_s: float,
                          *, per: str = "call", flag: str = "max_call_s") -> bool:
    """Mark ``row`` skipped (True) when the time predicted from a shorter length, ``predicted_s``
    = (seconds, growth exponent), is over ``limit_s``; the reason names the budget's ``flag``."""
    if predicted_s is None or predicted_s[0] <= limit_s:
        return False
    row.update(status="skipped", reason=(
        f"time budget: predicted {predicted_s[0]:.2f} s per {per} > {flag}={limit_s:g} s "
        f"(extrapolated from N={from_n} with growth exponent {predicted_s[1]:.2f})"))
    return True


def record_timing(row: dict, timing: measure.Timing) -> None:
    """The timed calls' median, spread, extremes and count into ``row``."""
    row.update(time_median_s=timing.median_s, time_spread=timing.spread_s, time_spread_kind=timing.spread_kind,
               time_min_s=timing.min_s, time_max_s=timing.max_s, repeats=timing.repeats)


def record_error(row: dict, err: BaseException) -> None:
    """``row`` becomes an error row naming the exception (one variant's failure never stops a sweep)."""
    msg = " ".join(str(err).split())
    row.update(status="error", reason=f"{type(err).__name__}: {msg[:400]}")


def measure_point(name: str, pass_: str, causal: bool, n: int, cfg: CostConfig, *,
                  matmul_gflops: float | None = None,
                  predicted_s: tuple[float, float] | None = None, from_n: int | None = None) -> dict[str, Any]:
    """Measure one (variant, pass, masking, N) point; never raises for a variant's failure."""
    row = base_row(name, pass_, causal, n, cfg)
    row["matmul_gflops"] = matmul_gflops
    if skip_over_time_budget(row, predicted_s, from_n, cfg.max_call_s):
        return row
    try:
        fn, args = point_function(name, pass_, causal, n, cfg)
        compiled, compile_s, jaxpr = measure.trace_and_compile(fn, *args)
        row["compile_s"] = compile_s
        if record_memory(row, compiled, cfg.memory_budget_bytes, "compiled program"):
            return row
        row.update(measure.count_flops(fn, args, compiled, jaxpr=jaxpr))
        del jaxpr
        timing = measure.time_compiled(compiled, *args, warmup=cfg.warmup, min_repeats=cfg.min_repeats,
                                       max_repeats=cfg.max_repeats, budget_s=cfg.repeat_budget_s,
                                       compile_s=compile_s)
        record_timing(row, timing)
        row["device_peak_bytes"] = measure.device_peak_bytes()
        if row["flops"]:
            row["gflops_per_s"] = row["flops"] / timing.median_s / 1e9
            if matmul_gflops:
                row["matmul_fraction"] = row["gflops_per_s"] / matmul_gflops
    except Exception as err:  # noqa: BLE001 - one variant's failure must not stop the sweep
        record_error(row, err)
    return row
