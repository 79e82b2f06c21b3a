"""``python -m efficient_attn.sweeps.exact``: the same as ``experiments/bench_exact.py``."""

from efficient_attn.sweeps.exact import main

raise SystemExit(main())
