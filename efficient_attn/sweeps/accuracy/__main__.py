"""``python -m efficient_attn.sweeps.accuracy``: the same as ``experiments/accuracy.py``."""

from efficient_attn.allocator import reexec_with_tuned_allocator

reexec_with_tuned_allocator()

from efficient_attn.sweeps.accuracy import main  # noqa: E402

raise SystemExit(main())
