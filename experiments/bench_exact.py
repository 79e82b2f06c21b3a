"""Exact attention side by side: full, blockwise, jax.nn.dot_product_attention (see efficient_attn/sweeps/exact/)."""

import sys

from efficient_attn.sweeps.exact import main

if __name__ == "__main__":
    sys.exit(main())
