"""Decoding cost of every decode-capable variant: per-token step latency and state / cache
memory against the context length, slopes, crossovers against full's KV cache.

    python experiments/decode_cost.py --preset quick                 # 1K-16K, about a minute and a half
    python experiments/decode_cost.py --preset cpu                   # 1K-64K
    python experiments/decode_cost.py --preset quick --report-only   # tables from the stored rows

The logic, presets and options live in the package ``efficient_attn.sweeps.decode_cost``;
``--help`` lists them. The exit status is 1 when a row errored, 2 for a bad flag.
"""

from efficient_attn.allocator import reexec_with_tuned_allocator
from efficient_attn.sweeps.decode_cost import main

if __name__ == "__main__":
    reexec_with_tuned_allocator()  # before any timing: see efficient_attn/allocator.py
    raise SystemExit(main())
