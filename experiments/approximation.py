"""Error of every attention variant against full attention as its budget grows, and pictures.

    python experiments/approximation.py --preset quick                 # or: efficient-attn approx --preset quick
    python experiments/approximation.py --preset quick --report-only   # outputs from the stored rows, no measuring

The logic, presets and options live in the package ``efficient_attn.sweeps.approximation``; ``--help`` lists
them. The exit status is 1 when a row errored, 2 for a bad flag.
"""

from efficient_attn.allocator import reexec_with_tuned_allocator
from efficient_attn.sweeps.approximation import main

if __name__ == "__main__":
    reexec_with_tuned_allocator()  # before any timing: see efficient_attn/allocator.py
    raise SystemExit(main())
