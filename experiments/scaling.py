"""Sequence-parallel scaling over simulated devices: per-device memory, communication and time.

    python experiments/scaling.py --preset quick        # a tiny check that the table is written
    python experiments/scaling.py --preset cpu          # the real table (minutes)

The logic and presets live in ``efficient_attn.sweeps.scaling``; ``--help`` lists the flags.
It runs in a child process with simulated CPU devices, all sharing this machine's cores: the
time column is not a speed-up figure. Exit status 1 when a row errored, 2 for a bad flag.
"""

from efficient_attn.allocator import reexec_with_tuned_allocator
from efficient_attn.sweeps.scaling import main

if __name__ == "__main__":
    reexec_with_tuned_allocator()  # before any timing: see efficient_attn/allocator.py
    raise SystemExit(main())
