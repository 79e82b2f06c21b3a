"""Exact attention side by side: full, blockwise, jax.nn.dot_product_attention; ``--preset peers``: blockwise
against the JAX peers (``make bench-peers``). See efficient_attn/sweeps/exact/."""

import sys

from efficient_attn.sweeps.exact import main

if __name__ == "__main__":
    sys.exit(main())
