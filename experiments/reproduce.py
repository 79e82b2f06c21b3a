"""Every experiment at one preset, then results/README.md (see efficient_attn/sweeps/reproduce.py)."""

from efficient_attn.allocator import reexec_with_tuned_allocator
import sys

from efficient_attn.sweeps.reproduce import main

if __name__ == "__main__":
    reexec_with_tuned_allocator()  # before any timing: see efficient_attn/allocator.py
    sys.exit(main())
