"""Several processes for one sweep (``--workers N``): each pinned to its own core.

The models of the cpu presets (width 64) are too small for XLA to keep two cores busy with one
training step: measured here, one process on both cores ran full's selective-copying step in
71 ms, two processes pinned one to a core in 83 and 92 ms each, 1.6x the tokens trained. Each
worker is the same command with a hidden ``--worker I``: it pins itself to core ``I`` (of the
cores this process may use) before jax starts, and takes units through ``sweeps.claims``; the
parent waits, passes SIGINT/SIGTERM on to them, and then writes the outputs from the shared
RowStore.

Pinned before jax starts, a worker's XLA thread pool is sized for one core (pinned after,
its threads spin against each other on that core and the gain is gone: 145 ms per step each).
Some reductions then split differently, so a worker's float rounding can differ from a
two-core process's (measured: the training loss 3e-8 apart after 3 steps); rows record the
cores their process had (``cores_used``), and workers reproduce workers' rows exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Sequence

__all__ = ["run_workers", "pin_to_core"]


def pin_to_core(index: int) -> int:
    """Pin this process to the ``index``-th core it may run on (modulo their number); that core."""
    cores = sorted(os.sched_getaffinity(0))
    core = cores[index % len(cores)]
    os.sched_setaffinity(0, {core})
    return core


def run_workers(count: int, argv: Sequence[str]) -> list[int]:
    """Start ``count`` copies of ``argv`` with ``--worker 0`` .. ``--worker count-1``, wait for
    all; their exit codes. SIGINT or SIGTERM to this process is passed on to every worker (their
    finished rows are stored; a rerun resumes the rest)."""
    procs = [subprocess.Popen([*argv, "--worker", str(i)]) for i in range(count)]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return [p.wait() for p in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
