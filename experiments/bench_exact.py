"""Exact attention side by side: full, blockwise, jax.nn.dot_product_attention; ``--preset peers``: blockwise
against the JAX peers (``make bench-peers``). See efficient_attn/sweeps/exact/."""

from efficient_attn.allocator import reexec_with_tuned_allocator
import sys

from efficient_attn.sweeps.exact import main

if __name__ == "__main__":
    reexec_with_tuned_allocator()  # before any timing: see efficient_attn/allocator.py
    sys.exit(main())
