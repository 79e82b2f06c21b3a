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
import time
from typing import Sequence

__all__ = ["run_workers", "pin_to_core", "exit_status", "die_with_parent"]


def pin_to_core(index: int) -> int:
    """Pin this process to the ``index``-th core it may run on (modulo their number); that core."""
    cores = sorted(os.sched_getaffinity(0))
    core = cores[index % len(cores)]
    os.sched_setaffinity(0, {core})
    return core


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` dies (Linux ``prctl``), and leave
    at once if it died before that was set. Without this a SIGKILLed command (which cannot
    pass the signal on) leaves its child running, appending rows beside the rerun's."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: Ctrl-C still reaches both (one process group)
        return
    if os.getppid() != parent:
        os._exit(128 + signal.SIGKILL)


def exit_status(codes: Sequence[int]) -> int | None:
    """The command's status from its workers' when they say more than the rows can: 2 (a bad
    flag), 130 (interrupted or killed by a signal), 1 (a worker crashed); None when each ended
    with 0 or 1 (the rows decide)."""
    if any(c == 2 for c in codes):
        return 2
    if any(c < 0 or c == 130 for c in codes):
        return 130
    if any(c not in (0, 1) for c in codes):
        return 1
    return None


def run_workers(count: int, argv: Sequence[str]) -> list[int]:
    """Start ``count`` copies of ``argv`` with ``--worker 0`` .. ``--worker count-1``, wait for
    all; their exit codes. SIGINT or SIGTERM to this process is passed on to every worker (their
    finished rows are stored; a rerun resumes the rest)."""
    parent = os.getpid()
    env = dict(os.environ, EA_SWEEP_ID=f"{parent}-{time.time_ns()}")  # rows of this sweep (errors not retried)
    procs: list[subprocess.Popen] = []
    try:
        for i in range(count):  # own session: only this process passes Ctrl-C on (once)
            procs.append(subprocess.Popen([*argv, "--worker", str(i)], env=env, start_new_session=True,
                                          preexec_fn=lambda: die_with_parent(parent)))
    except BaseException:
        for p in procs:
            p.kill()
        raise

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
