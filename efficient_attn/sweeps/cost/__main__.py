"""``python -m efficient_attn.sweeps.cost``: the same as ``experiments/cost_scaling.py``."""

from efficient_attn.sweeps.cost import main

raise SystemExit(main())
