"""Interleaved timing: several compiled programs timed in rounds, one call of each per round.

Timing one program to the end before the next lets a slow drift of the machine (another
process, the clock, the cache) fall on one program only and bias their ratio; in rounds it
falls on all of them alike. The order is rotated each round, so no program always runs
first after the others' (possibly cache-evicting) calls. Within a round each program is
called ``settle`` times untimed right before its timed call: the quadratic programs' N x N
intermediates (1 GiB at N = 4096) evict every cache, and a kernel timed straight after them
pays for refilling its working set (blockwise forward at N = 4096 measured 731 ms so against
442-483 ms timed back to back), which is not the kernel's cost in a model.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import jax

__all__ = ["Program", "time_interleaved", "summary"]

# name -> (compiled program, its arguments, compile seconds)
Program = tuple[Callable, Sequence[Any], float]


def summary(times: Sequence[float], compile_s: float) -> dict[str, Any]:
    """The stored timing of one program: median, min, max, every round's time, compile time."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": list(times), "compile_s": compile_s}


def time_interleaved(programs: Mapping[str, Program], *, repeats: int, warmup: int = 1,
                     settle: int = 1) -> dict[str, dict]:
    """``warmup`` untimed calls of each program, then ``repeats`` rounds, each program's timed
    call preceded by ``settle`` untimed ones (module docstring); each call is wrapped in
    ``jax.block_until_ready`` (asynchronous dispatch would otherwise time only the launch)."""
    if repeats < 1 or warmup < 0 or settle < 0:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and settle >= 0, got {repeats}, {warmup}, {settle}")
    names = list(programs)
    for name in names:
        compiled, args, _ = programs[name]
        for _ in range(warmup):
            jax.block_until_ready(compiled(*args))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            compiled, args, _ = programs[name]
            for _ in range(settle):
                jax.block_until_ready(compiled(*args))
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: summary(times[name], programs[name][2]) for name in names}
