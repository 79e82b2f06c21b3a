"""Measuring one peers row: blockwise, ``jax.nn.dot_product_attention`` and the JAX peers at
one (causal, N, pass), each checked against ``full``, then timed in the same interleaved
rounds as the matmul reference, so that the row's ratios come from one run.

Every program of the row computes the same thing on the row's own inputs
(``programs.checked_program``: the output; for forward+backward the output and the gradients
of ``sum(out)``). ``full`` runs once, untimed, as the reference: it is not one of the timed
columns (its times are in the quick table). Each program's first untimed call is the check
(``timing.time_interleaved``'s ``first_call``, so that it costs no call of its own); a peer

- that disagrees with ``full`` by more than ``ATOL`` (any output, any gradient), or fails,
  is recorded as an error with the reason and not timed: never a wrong number in the table;
- whose checked call took longer than ``peer_call_budget_s`` is recorded and not timed;
- not installed, or without a causal mode in a causal row, is recorded and not compiled.

``blockwise`` disagreeing or failing is an error of the row: its ratios would mean nothing.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array

from efficient_attn import measure
from efficient_attn.sweeps.exact import peers, programs
from efficient_attn.sweeps.exact.peers import first_line as _first_line
from efficient_attn.sweeps.exact.config import PEER_BASELINES, ExactConfig
from efficient_attn.sweeps.exact.timing import time_interleaved

__all__ = ["ATOL", "OUTPUTS", "measure_row", "installed_since"]

ATOL = 1e-3  # max abs difference from full (float32) beyond which a peer's cell is an error
OUTPUTS = ("out", "dq", "dk", "dv")  # what a checked program returns, in order
MATMUL = "matmul"
BW, DPA = PEER_BASELINES
_SETTINGS = {
    BW: "blockwise_attention's defaults: block_size=1024, backward_query_block=256 (clipped to N)",
    DPA: "jax.nn.dot_product_attention(is_causal=causal), implementation=None (XLA)",
}


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _errors(got, want: tuple[Array, ...]) -> dict[str, float]:
    """Max abs difference of each output from the reference's (NaN where either is NaN)."""
    got = _as_tuple(got)
    shapes, ref_shapes = [g.shape for g in got], [w.shape for w in want]
    if shapes != ref_shapes:
        raise ValueError(f"output shapes {shapes} are not full's {ref_shapes}")
    return {name: float(jnp.max(jnp.abs(g - w))) for name, g, w in zip(OUTPUTS, got, want)}


def _worst(errors: dict[str, float]) -> tuple[str, float]:
    name = next((k for k, e in errors.items() if math.isnan(e)), None) or max(errors, key=errors.get)
    return name, errors[name]


def _candidates(causal: bool, cfg: ExactConfig, cells: dict[str, dict]) -> dict[str, programs.Fn]:
    """The functions to compile, ours first; a peer not available gets its cell here instead."""
    ours = programs.impls(causal)
    fns: dict[str, programs.Fn] = {BW: ours[BW], DPA: ours[DPA]}
    for name in PEER_BASELINES:
        cells[name] = {"settings": _SETTINGS[name]}
    for name in cfg.peers:
        peer = peers.load(name)
        if peer.fn is None:
            cells[name] = {"status": "missing", "reason": peer.note}
        elif causal and not peer.causal:
            cells[name] = {"status": "unsupported", "reason": f"{name} has no causal mode", "settings": peer.note}
        else:
            cells[name] = {"settings": peer.note}
            fns[name] = (lambda fn: lambda q, k, v: fn(q, k, v, causal))(peer.fn)
    return fns


def _checker(progs: dict, ref: tuple[Array, ...], cells: dict[str, dict], budget: float | None) -> Callable:
    """timing's ``first_call``: the checked first call of each program (module docstring)."""

    def first_call(name: str) -> str | None:
        compiled, args, _ = progs[name]
        t0 = time.perf_counter()
        try:
            out = jax.block_until_ready(compiled(*args))
            seconds = time.perf_counter() - t0
            if name == MATMUL:
                return None
            errors = _errors(out, ref)
        except Exception as err:
            if name == BW:
                raise
            cells[name].update(status="error", reason=f"failed: {_first_line(err)}")
            return cells[name]["reason"]
        which, worst = _worst(errors)
        cells[name].update(errors=errors, max_abs_err=worst, first_call_s=seconds)
        if not worst <= ATOL:  # NaN included
            reason = f"disagrees with full: max abs error {worst:.3g} > {ATOL:g} (in {which})"
            if name == BW:
                raise RuntimeError(f"blockwise {reason}: a bug of ours (the row's ratios would mean nothing)")
            cells[name].update(status="error", reason=reason)
            return reason
        if budget is not None and name != BW and seconds > budget:
            reason = f"one call took {seconds:.1f} s, over the per-call budget of {budget:g} s (peer_call_budget_s)"
            cells[name].update(status="over_budget", reason=reason)
            return reason
        return None

    return first_call


def measure_row(n: int, pass_name: str, causal: bool, cfg: ExactConfig) -> dict[str, Any]:
    """The measured part of a peers row (module docstring); raises only for blockwise."""
    args = programs.inputs(n, cfg.batch, cfg.heads, cfg.head_dim)
    full, _ = measure.compile_function(programs.checked_program(programs.impls(causal)["full"], pass_name), *args)
    ref = _as_tuple(jax.block_until_ready(full(*args)))
    del full
    cells: dict[str, dict] = {}
    progs = {}
    for name, fn in _candidates(causal, cfg, cells).items():
        try:
            compiled, compile_s = measure.compile_function(programs.checked_program(fn, pass_name), *args)
        except Exception as err:
            if name == BW:
                raise
            cells[name].update(status="error", reason=f"did not compile: {_first_line(err)}")
            continue
        progs[name] = (compiled, args, compile_s)
    mm, mm_args, mm_flops = programs.matmul_program(cfg.matmul_n)
    compiled, compile_s = measure.compile_function(mm, *mm_args)
    progs[MATMUL] = (compiled, mm_args, compile_s)
    timings = time_interleaved(progs, repeats=cfg.peer_rounds(n), warmup=cfg.warmup, settle=cfg.peer_settle,
                               first_call=_checker(progs, ref, cells, cfg.peer_call_budget_s))
    rate = mm_flops / timings[MATMUL]["median_s"]
    flops = programs.attention_flops(n, cfg.batch, cfg.heads, cfg.head_dim, causal=causal,
                                     backward=pass_name == "fwd_bwd")
    for name, t in timings.items():
        if name != MATMUL and "dropped" not in t:
            cells[name].update(status="ok", **t, gflops=flops / t["median_s"] / 1e9,
                               matmul_fraction=flops / t["median_s"] / rate)
    order = [*PEER_BASELINES, *cfg.peers]
    return {"flops": flops, "atol": ATOL, "rounds": cfg.peer_rounds(n), "impls": {name: cells[name] for name in order},
            MATMUL: {**timings[MATMUL], "n": cfg.matmul_n, "flops": mm_flops, "gflops": rate / 1e9}}


def installed_since(row: dict) -> bool:
    """A stored peers row that recorded a peer as not installed, which now loads: the row is
    measured again, so that installing the extra later fills the column."""
    missing = [name for name, cell in row.get("impls", {}).items() if cell.get("status") == "missing"]
    return row.get("kind") == "peers" and any(peers.load(name).fn is not None for name in missing)
