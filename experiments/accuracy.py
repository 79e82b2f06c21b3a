"""Accuracy of every attention variant on every task (see efficient_attn/sweeps/accuracy.py)."""

import sys

from efficient_attn.sweeps.accuracy import main

if __name__ == "__main__":
    sys.exit(main())
