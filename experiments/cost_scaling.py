"""Cost of every attention variant against the sequence length (time, memory, FLOPs, crossovers).

    python experiments/cost_scaling.py --preset quick                 # or: efficient-attn bench --preset quick
    python experiments/cost_scaling.py --preset quick --report-only   # tables from the stored rows, no measuring

The logic, presets and options live in the package ``efficient_attn.sweeps.cost``; ``--help`` lists them.
The exit status is 1 when a row errored, 2 for a bad flag.
"""

from efficient_attn.allocator import reexec_with_tuned_allocator
from efficient_attn.sweeps.cost import main

if __name__ == "__main__":
    reexec_with_tuned_allocator()  # before any timing: see efficient_attn/allocator.py
    raise SystemExit(main())
