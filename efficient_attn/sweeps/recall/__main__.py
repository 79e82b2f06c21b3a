"""``python -m efficient_attn.sweeps.recall``: the same as ``experiments/recall.py``."""

from efficient_attn.sweeps.recall import main

raise SystemExit(main())
