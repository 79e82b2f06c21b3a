"""One point of the decode-cost sweep: a (variant, batch, context) step timed, its state sized.

The state a step runs on holds ``context`` tokens: it is made by ``init_state`` and then
given the position ``context`` and random contents (every slot real). A step's work depends
on its position and the state's sizes, not on what the state holds, and prefilling 64K
tokens of softmax attention just to time one step would cost minutes; the decode
conformance tests check that real prefills and steps compute the right thing.

- time: one jitted program runs ``steps_per_call`` steps (a ``lax.scan`` of ``step`` over
  random tokens) from that state; compiled once (``compile_s`` apart), warm-up, then the
  median and spread of timed calls (``measure.time_compiled``), divided by the steps. The
  state is an input of the call, not donated, so each call also copies it once (amortised
  over the steps). The attention core only: no projections, no vocabulary head.
- memory: ``state_bytes``, the bytes of the state's arrays (exact, from their shapes: known
  for every point, measured or not), and ``step_temp_bytes``, the compiled program's
  temporaries (``compiled.memory_analysis()``) per call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import efficient_attn as ea
from efficient_attn import measure, report
from efficient_attn.sweeps.decode_cost.config import DecodeCostConfig

__all__ = ["module", "state_len", "state_bytes", "base_row", "compiled_step", "step_arguments", "measure_point",
           "clear"]


@functools.lru_cache(maxsize=64)
def module(name: str, heads: int, head_dim: int, max_len: int, seed: int):
    """The variant, built once per sweep shape (its fixed random patterns are drawn eagerly)."""
    return ea.build(name, num_heads=heads, head_dim=head_dim, max_len=max_len, rngs=nnx.Rngs(seed))


def _shapes(m, batch: int, length: int, dtype) -> list[tuple]:
    s = jax.eval_shape(lambda: m.init_state(batch, max_len=length, dtype=dtype).data)
    return [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(s)]


def state_len(name: str, context: int, cfg: DecodeCostConfig) -> int:
    """The state's max_len for a point: the context plus one call's steps when the state grows
    with max_len (a KV cache); the sweep's max_len otherwise, so that one program serves every
    context (its position is a traced value)."""
    m = module(name, cfg.heads, cfg.head_dim, cfg.max_len, cfg.seed)
    dtype = jnp.dtype(cfg.dtype)
    fixed = _shapes(m, 1, cfg.steps_per_call + 1, dtype) == _shapes(m, 1, cfg.max_len, dtype)
    return cfg.max_len if fixed else context + cfg.steps_per_call


def state_bytes(name: str, batch: int, context: int, cfg: DecodeCostConfig) -> int:
    """Bytes of the decoding state's arrays for this point (position included)."""
    m = module(name, cfg.heads, cfg.head_dim, cfg.max_len, cfg.seed)
    s = jax.eval_shape(lambda: m.init_state(batch, max_len=state_len(name, context, cfg), dtype=jnp.dtype(cfg.dtype)))
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(s)))


def base_row(name: str, batch: int, context: int, cfg: DecodeCostConfig) -> dict[str, Any]:
    spec = ea.get_spec(name)
    return {
        "variant": name, "family": spec.family, "batch": batch, "context": context, "heads": cfg.heads,
        "head_dim": cfg.head_dim, "dtype": cfg.dtype, "steps_per_call": cfg.steps_per_call,
        "state_len": state_len(name, context, cfg), "state_bytes": state_bytes(name, batch, context, cfg),
        "max_step_s": cfg.max_step_s, "memory_budget_bytes": cfg.memory_budget_bytes,
    }


def _synthetic_state(m, batch: int, length: int, context: int, cfg: DecodeCostConfig):
    """A state at position ``context``: random floats, every slot real, slot positions as made."""
    s = m.init_state(batch, max_len=length, dtype=jnp.dtype(cfg.dtype))
    rng = np.random.default_rng(cfg.seed)

    def fill(x):
        if x.dtype == jnp.bool_:
            return jnp.ones_like(x)
        if jnp.issubdtype(x.dtype, jnp.integer):
            return x
        return jnp.asarray(0.1 * rng.standard_normal(x.shape, dtype=np.float32), x.dtype)

    return dataclasses.replace(s, position=jnp.asarray(context, jnp.int32), data=jax.tree.map(fill, s.data))


@functools.lru_cache(maxsize=8)
def compiled_step(name: str, batch: int, length: int, cfg: DecodeCostConfig):
    """(compiled step program, its compile seconds, the module's state): one per state shape,
    so a fixed-size state (whose max_len is the sweep's) is compiled once for every context."""
    m = module(name, cfg.heads, cfg.head_dim, cfg.max_len, cfg.seed)
    graphdef, state = nnx.split(m)

    def run(state, dstate, q, k, v):
        mod = nnx.merge(graphdef, state, copy=True)

        def one(s, xs):
            out, s = mod.step(*xs, s)
            return s, out

        s, outs = jax.lax.scan(one, dstate, (q, k, v))
        return outs, s.position

    dstate, tokens = step_arguments(m, batch, length, cfg.contexts[0], cfg)
    compiled, compile_s = measure.compile_function(run, state, dstate, *tokens)
    return compiled, compile_s, state


def step_arguments(m, batch: int, length: int, context: int, cfg: DecodeCostConfig):
    """(the synthetic state at ``context``, the ``steps_per_call`` random q, k, v tokens) of a call."""
    rng = np.random.default_rng(cfg.seed + 1)
    shape = (cfg.steps_per_call, batch, 1, cfg.heads, cfg.head_dim)
    tokens = tuple(jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.dtype(cfg.dtype)) for _ in range(3))
    return _synthetic_state(m, batch, length, context, cfg), tokens


def measure_point(name: str, batch: int, context: int, cfg: DecodeCostConfig) -> dict[str, Any]:
    """Time one step at ``context`` and size its state; a failure becomes an "error" row."""
    row = base_row(name, batch, context, cfg)
    row["environment"] = report.row_environment(cfg.preset)
    try:
        m = module(name, cfg.heads, cfg.head_dim, cfg.max_len, cfg.seed)
        compiled, compile_s, state = compiled_step(name, batch, row["state_len"], cfg)
        dstate, tokens = step_arguments(m, batch, row["state_len"], context, cfg)
        timing = measure.time_compiled(compiled, state, dstate, *tokens, warmup=cfg.warmup,
                                       min_repeats=cfg.min_repeats, max_repeats=cfg.max_repeats,
                                       budget_s=cfg.repeat_budget_s, compile_s=compile_s)
        mem = measure.compiled_memory(compiled)
        steps = cfg.steps_per_call
        row.update(
            status="ok", step_median_s=timing.median_s / steps, step_spread_s=timing.spread_s / steps,
            spread_kind=timing.spread_kind, repeats=timing.repeats, compile_s=compile_s,
            step_temp_bytes=None if mem is None else mem.temp_bytes,
        )
    except Exception as err:  # noqa: BLE001 -- one broken variant must not stop the sweep
        row.update(status="error", reason=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return row


def clear() -> None:
    """Drop the built modules and compiled programs (the end of a sweep)."""
    compiled_step.cache_clear()
    module.cache_clear()
