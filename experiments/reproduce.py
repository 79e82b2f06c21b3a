"""Every experiment at one preset, then results/README.md (see efficient_attn/sweeps/reproduce.py)."""

import sys

from efficient_attn.sweeps.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
