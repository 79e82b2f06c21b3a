"""The units of the kernel benchmark (one stored row each), their keys, and measuring one.

A time row holds every implementation of its (N, pass) and the matmul reference, timed in
the same interleaved rounds (``timing``), so the speed-ups and the fractions of the matmul
rate in a row never mix two runs; a resumed run only adds whole rows. A config with peers
has peers rows instead (``peer_rows``), one per (causal, N, pass); their keys name the kind,
the mask and the implementations, so they never meet the other rows' keys.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp

from efficient_attn import measure, report
from efficient_attn.sweeps.exact import peer_rows, programs
from efficient_attn.sweeps.exact.config import IMPLS, MEMORY_IMPLS, PASSES, PEER_BASELINES, ExactConfig
from efficient_attn.sweeps.exact.timing import time_interleaved

__all__ = ["Unit", "units", "row_key", "base_row", "measure_unit", "row_environment", "MATMUL"]

MATMUL = "matmul"  # the reference program's name inside a time row


row_environment = report.row_environment  # what each row records of the machine it was measured on


@dataclasses.dataclass(frozen=True)
class Unit:
    kind: str  # "time", "memory", "causal", "huge" or "peers"
    n: int
    pass_name: str  # "fwd" or "fwd_bwd"
    causal: bool | None = None  # peers rows: the mask (None for the other kinds)


def units(cfg: ExactConfig) -> list[Unit]:
    """Every unit of ``cfg`` in visiting order: time rows by N, then memory, causal, huge;
    with peers, only peers rows: by mask, then N, then pass."""
    if cfg.peers:
        return [Unit("peers", n, p, c) for c in cfg.peer_causal for n in dict.fromkeys(cfg.lengths) for p in PASSES]
    out = [Unit("time", n, p) for n in dict.fromkeys(cfg.lengths) for p in PASSES]
    out += [Unit("memory", cfg.memory_n, "fwd_bwd"), Unit("causal", cfg.causal_n, "fwd")]
    if cfg.huge_n is not None:
        out.append(Unit("huge", cfg.huge_n, "fwd_bwd"))
    return out


def row_key(unit: Unit, cfg: ExactConfig) -> str:
    """What a row's numbers depend on: a stored row is reused only for the same measurement."""
    parts: list[Any] = ["exact", unit.kind, unit.n, unit.pass_name, cfg.batch, cfg.heads, cfg.head_dim, "float32"]
    if unit.kind == "peers":
        return report.RowStore.make_key(
            *parts, "causal" if unit.causal else "non_causal", "impls=" + ",".join([*PEER_BASELINES, *cfg.peers]),
            f"repeats={cfg.repeats}", f"warmup={cfg.warmup}", f"settle={cfg.peer_settle}", f"matmul={cfg.matmul_n}",
            f"budget_s={cfg.peer_call_budget_s}", f"atol={peer_rows.ATOL:g}", f"rounds={cfg.peer_rounds(unit.n)}")
    if unit.kind in ("time", "causal"):
        parts += [f"repeats={cfg.repeats}", f"warmup={cfg.warmup}"]
    if unit.kind == "time":
        parts.append(f"matmul={cfg.matmul_n}")
    return report.RowStore.make_key(*parts)


def base_row(unit: Unit, cfg: ExactConfig) -> dict[str, Any]:
    row = {"kind": unit.kind, "n": unit.n, "pass": unit.pass_name, "batch": cfg.batch, "heads": cfg.heads,
           "head_dim": cfg.head_dim, "dtype": "float32"}
    return row if unit.causal is None else {**row, "causal": unit.causal}


def _time_row(unit: Unit, cfg: ExactConfig) -> dict[str, Any]:
    args = programs.inputs(unit.n, cfg.batch, cfg.heads, cfg.head_dim)
    progs = {}
    for name in IMPLS:
        compiled, compile_s = measure.compile_function(programs.program(name, unit.pass_name), *args)
        progs[name] = (compiled, args, compile_s)
    mm, mm_args, mm_flops = programs.matmul_program(cfg.matmul_n)
    compiled, compile_s = measure.compile_function(mm, *mm_args)
    progs[MATMUL] = (compiled, mm_args, compile_s)
    timings = time_interleaved(progs, repeats=cfg.repeats, warmup=cfg.warmup)
    rate = mm_flops / timings[MATMUL]["median_s"]
    flops = programs.attention_flops(unit.n, cfg.batch, cfg.heads, cfg.head_dim, backward=unit.pass_name == "fwd_bwd")
    impls = {}
    for name in IMPLS:
        t = timings[name]
        impls[name] = {**t, "gflops": flops / t["median_s"] / 1e9, "matmul_fraction": flops / t["median_s"] / rate}
    return {"flops": flops, "impls": impls,
            MATMUL: {**timings[MATMUL], "n": cfg.matmul_n, "flops": mm_flops, "gflops": rate / 1e9}}


def _memory(compiled) -> dict[str, Any]:
    m = measure.compiled_memory(compiled)
    return {"temp_bytes": None if m is None else m.temp_bytes, "total_bytes": None if m is None else m.total_bytes}


def _memory_row(unit: Unit, cfg: ExactConfig) -> dict[str, Any]:
    spec = jax.ShapeDtypeStruct((cfg.batch, unit.n, cfg.heads, cfg.head_dim), jnp.float32)
    impls = {}
    for name in MEMORY_IMPLS:
        compiled, compile_s = measure.compile_function(programs.program(name, "fwd_bwd"), spec, spec, spec)
        impls[name] = {**_memory(compiled), "compile_s": compile_s}
    return {"impls": impls}


def _causal_row(unit: Unit, cfg: ExactConfig) -> dict[str, Any]:
    args = programs.inputs(unit.n, cfg.batch, cfg.heads, cfg.head_dim)
    progs = {}
    for label, causal in (("non_causal", False), ("causal", True)):
        compiled, compile_s = measure.compile_function(programs.program("blockwise", "fwd", causal), *args)
        progs[label] = (compiled, args, compile_s)
    return {"impl": "blockwise", "timings": time_interleaved(progs, repeats=cfg.repeats, warmup=cfg.warmup)}


def _huge_row(unit: Unit, cfg: ExactConfig) -> dict[str, Any]:
    """One call, no warm-up: at N = 65536 a call takes minutes, and what is shown is that it
    runs, in how much compiled memory, rather than a median."""
    args = programs.inputs(unit.n, cfg.batch, cfg.heads, cfg.head_dim)
    compiled, compile_s = measure.compile_function(programs.program("blockwise", "fwd_bwd"), *args)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return {"impl": "blockwise", "time_s": time.perf_counter() - t0, "compile_s": compile_s, **_memory(compiled)}


def _peers_row(unit: Unit, cfg: ExactConfig) -> dict[str, Any]:
    return peer_rows.measure_row(unit.n, unit.pass_name, unit.causal, cfg)


_MEASURE = {"time": _time_row, "memory": _memory_row, "causal": _causal_row, "huge": _huge_row, "peers": _peers_row}


def measure_unit(unit: Unit, cfg: ExactConfig) -> dict[str, Any]:
    """The finished row of ``unit`` (status "ok"); an exception propagates to the sweep."""
    return {**base_row(unit, cfg), "status": "ok", **_MEASURE[unit.kind](unit, cfg)}
