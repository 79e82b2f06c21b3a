"""Throughput of the full encoder against the same model on flax.nnx.MultiHeadAttention (see efficient_attn/sweeps/exact/encoder.py)."""

import sys

from efficient_attn.sweeps.exact import encoder_main

if __name__ == "__main__":
    sys.exit(encoder_main())
