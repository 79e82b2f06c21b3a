"""``python -m efficient_attn.sweeps.decode_cost``: the same as ``experiments/decode_cost.py``."""

from efficient_attn.sweeps.decode_cost import main

raise SystemExit(main())
