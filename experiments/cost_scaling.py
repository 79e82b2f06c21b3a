"""Cost of every attention variant against the sequence length (time, memory, FLOPs, crossovers).

    python experiments/cost_scaling.py --preset quick      # or: efficient-attn bench --preset quick

The logic, presets and options live in ``efficient_attn.sweeps.cost``; ``--help`` lists them.
"""

from efficient_attn.sweeps.cost import main

if __name__ == "__main__":
    raise SystemExit(main())
