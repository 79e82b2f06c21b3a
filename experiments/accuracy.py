"""Accuracy of every attention variant on every task, over seeds (the LRA Table 1 analog).

    python experiments/accuracy.py --preset quick                      # or: efficient-attn train --preset quick
    python experiments/accuracy.py --preset cpu --variants full --seeds 0 --tasks mqar

The logic, presets and options live in the package ``efficient_attn.sweeps.accuracy``; ``--help``
lists them. Finished rows are kept and skipped on a rerun (``--force`` recomputes). The exit
status is 1 when a row of the run errored, 2 for a bad flag.
"""

from efficient_attn.allocator import reexec_with_tuned_allocator
from efficient_attn.sweeps.accuracy import main

if __name__ == "__main__":
    reexec_with_tuned_allocator()  # before any timing: see efficient_attn/allocator.py
    raise SystemExit(main())
