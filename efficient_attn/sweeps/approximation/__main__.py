"""``python -m efficient_attn.sweeps.approximation``: the same as ``experiments/approximation.py``."""

from efficient_attn.sweeps.approximation import main

raise SystemExit(main())
