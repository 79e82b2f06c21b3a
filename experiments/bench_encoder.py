"""Throughput of the full encoder against the same model on flax.nnx.MultiHeadAttention (see efficient_attn/sweeps/exact/encoder.py)."""

from efficient_attn.allocator import reexec_with_tuned_allocator
import sys

from efficient_attn.sweeps.exact import encoder_main

if __name__ == "__main__":
    reexec_with_tuned_allocator()  # before any timing: see efficient_attn/allocator.py
    sys.exit(encoder_main())
