"""``python -m efficient_attn.sweeps.accuracy``: the same as ``experiments/accuracy.py``."""

from efficient_attn.sweeps.accuracy import main

raise SystemExit(main())
