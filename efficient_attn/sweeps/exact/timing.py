"""Interleaved timing: several compiled programs timed in rounds, one call of each per round.

Timing one program to the end before the next lets a slow drift of the machine (another
process, the clock, the cache) fall on one program only and bias their ratio; in rounds it
falls on all of them alike. The order is rotated each round, so no program always runs
first after the others' (possibly cache-evicting) calls. Within a round each program is
called ``settle`` times untimed right before its timed call: the quadratic programs' N x N
intermediates (1 GiB at N = 4096) evict every cache, and a kernel timed straight after them
pays for refilling its working set (blockwise forward at N = 4096 measured 731 ms so against
442-483 ms timed back to back), which is not the kernel's cost in a model.

A caller that must vet each program before timing it (the peers rows check every output
against ``full``) passes ``first_call``: it makes each program's first untimed call itself
(a warm-up call, or with ``warmup=0`` the settle call of the first round, so that the check
costs no call of its own) and may drop the program, which is then called no more.
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


def time_interleaved(programs: Mapping[str, Program], *, repeats: int, warmup: int = 1, settle: int = 1,
                     first_call: Callable[[str], str | None] | None = None) -> dict[str, dict]:
    """``warmup`` untimed calls of each program, then ``repeats`` rounds, each program's timed
    call preceded by ``settle`` untimed ones (module docstring); each call is wrapped in
    ``jax.block_until_ready`` (asynchronous dispatch would otherwise time only the launch).

    ``first_call(name)``, when given, replaces each program's first untimed call and returns
    None to keep the program or the reason to drop it; a dropped program's entry is
    ``{"dropped": reason}`` instead of its timing."""
    if repeats < 1 or warmup < 0 or settle < 0:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and settle >= 0, got {repeats}, {warmup}, {settle}")
    if first_call is not None and warmup + settle == 0:
        raise ValueError("first_call makes a program's first untimed call: needs warmup >= 1 or settle >= 1")
    names = list(programs)
    unseen = set(names) if first_call is not None else set()
    dropped: dict[str, str] = {}

    def untimed(name: str) -> None:
        if name in unseen:
            unseen.discard(name)
            reason = first_call(name)
            if reason is not None:
                dropped[name] = reason
            return
        compiled, args, _ = programs[name]
        jax.block_until_ready(compiled(*args))

    for name in names:
        for _ in range(warmup):
            if name not in dropped:
                untimed(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(settle):
                if name not in dropped:
                    untimed(name)
            if name in dropped:
                continue
            compiled, args, _ = programs[name]
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: {"dropped": dropped[name]} if name in dropped else summary(times[name], programs[name][2])
            for name in names}
