"""Error of every attention variant against full attention as its budget grows, and pictures.

    python experiments/approximation.py --preset quick      # or: efficient-attn approx --preset quick

The logic, presets and options live in ``efficient_attn.sweeps.approximation``; ``--help`` lists them.
"""

from efficient_attn.sweeps.approximation import main

if __name__ == "__main__":
    raise SystemExit(main())
