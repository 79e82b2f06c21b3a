"""The memory allocator timings run under: glibc's malloc, tuned so that large buffers are not page-faulted on every call.

XLA's CPU runtime allocates every large output and temporary with ``malloc`` and frees it
after the call. glibc serves an allocation above its mmap threshold (dynamic, at most 32 MiB
by default) with a fresh ``mmap`` and gives it back with ``munmap``, so each call touches
every 4 KiB page of such a buffer for the first time again: one minor page fault per page
(measured here: 8,193 faults for a 32 MiB output, 2.3 us each, so an elementwise op on 32 MiB
ran at 2.7 GB/s where numpy reusing its output buffer ran at 16 GB/s). Those faults are a
cost of the allocator, not of the algorithm, and they grow with N: they raise the measured
time slopes of the O(N) variants between 1K and 16K (below), i.e. in exactly the large-N region
the cost tables exist for.

The fix is four glibc tunables (glibc >= 2.35), read once when a process starts:

    glibc.malloc.hugetlb=1                   transparent huge pages for the heap (madvise): 512x
                                             fewer faults where a page is new
    glibc.malloc.mmap_threshold=4294967296   buffers up to 4 GiB come from the heap, not from mmap
    glibc.malloc.trim_threshold=4294967296   a freed buffer stays in the heap for the next call
    glibc.malloc.arena_max=1                 one arena: XLA's worker threads reuse the same heap
                                             (a thread's own arena is an mmapped heap of its own)

Measured on the 2-core machine, B=1 H=8 D=64, median of 5 calls, two rounds of separate
processes (the VM's memory management makes single runs noisy): local causal forward at
16K 243-258 -> 123-152 ms and at 4K 75-76 -> 35-36 ms; linear bidirectional forward at 16K
239-260 -> 134-140 ms; bigbird causal forward at 16K 846-912 -> 606-749 ms; minor faults per
call of a 32 MiB elementwise op 8,193 -> 13. Compute-bound calls (full attention at 4K) do
not change. The price: a process keeps its peak heap until it exits.

``GLIBC_TUNABLES`` has to be in the environment before the interpreter starts, so the
experiments' command lines call ``reexec_with_tuned_allocator()`` first: when the tunables
are missing (and the platform has them), it replaces the process by the same command with
them set. The Makefile exports them for every target. ``EA_SYSTEM_MALLOC=1`` keeps the
system's defaults (for comparing); ``describe()`` is what the results record.
"""

from __future__ import annotations

import os
import platform
import sys

__all__ = ["TUNABLES", "OPT_OUT", "supported", "is_tuned", "tuned_environment", "describe",
           "reexec_with_tuned_allocator"]

TUNABLES = (
    "glibc.malloc.hugetlb=1",
    "glibc.malloc.mmap_threshold=4294967296",
    "glibc.malloc.trim_threshold=4294967296",
    "glibc.malloc.arena_max=1",
)
OPT_OUT = "EA_SYSTEM_MALLOC"


def supported() -> bool:
    """Linux with glibc 2.35 or newer (where ``glibc.malloc.hugetlb`` exists)."""
    if sys.platform != "linux":
        return False
    lib, version = platform.libc_ver()
    if lib != "glibc":
        return False
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def _present(env) -> set[str]:
    return {t.strip() for t in env.get("GLIBC_TUNABLES", "").split(":") if t.strip()}


def is_tuned(env=None) -> bool:
    """Whether ``env`` (default: this process's) sets every one of ``TUNABLES``."""
    env = os.environ if env is None else env
    return set(TUNABLES) <= _present(env)


def tuned_environment(env=None) -> dict[str, str]:
    """A copy of ``env`` with ``TUNABLES`` added to ``GLIBC_TUNABLES`` (other tunables kept)."""
    env = dict(os.environ if env is None else env)
    have = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t.strip()]
    names = {t.split("=", 1)[0] for t in TUNABLES}
    kept = [t for t in have if t.split("=", 1)[0] not in names]
    env["GLIBC_TUNABLES"] = ":".join(kept + list(TUNABLES))
    return env


def describe(env=None) -> str:
    """One phrase for the results: which allocator settings this process runs under."""
    env = os.environ if env is None else env
    if is_tuned(env):
        return "glibc malloc tuned: hugetlb=1, mmap and trim thresholds 4 GiB, one arena (efficient_attn.allocator)"
    if env.get(OPT_OUT):
        return f"glibc malloc defaults ({OPT_OUT} set)"
    return "system malloc defaults" if not supported() else "glibc malloc defaults (not tuned)"


def reexec_with_tuned_allocator() -> None:
    """Re-execute this command with ``TUNABLES`` set when they are missing; otherwise return.

    For command-line entry points only (it replaces the process). Nothing happens when the
    platform lacks the tunables, when they are set, or when ``EA_SYSTEM_MALLOC`` is set.
    """
    if not supported() or is_tuned() or os.environ.get(OPT_OUT):
        return
    argv = [sys.executable] + list(getattr(sys, "orig_argv", [sys.executable] + sys.argv)[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, tuned_environment())
