"""MQAR recall against the state each variant keeps per layer (Zoology Fig. 2, Based Fig. 2).

    python experiments/recall.py --preset quick                 # minutes: a smoke run
    python experiments/recall.py --preset cpu --variants full,local,gla

The logic and presets live in ``efficient_attn.sweeps.recall``; ``--help`` lists the flags.
Finished rows are kept and skipped on a rerun (``--force`` recomputes).
"""

from efficient_attn.allocator import reexec_with_tuned_allocator
from efficient_attn.sweeps.recall import main

if __name__ == "__main__":
    reexec_with_tuned_allocator()  # before any timing: see efficient_attn/allocator.py
    raise SystemExit(main())
