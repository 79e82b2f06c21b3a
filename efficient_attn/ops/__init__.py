"""Shared engines the variants compose; no variant re-implements one.

masks.py          visibility of (query, key) pairs from a Mask, dense (for full) or per block
online_softmax.py the exact blockwise softmax with a recomputing custom_vjp (blockwise, and
                  the exact path of the models)
"""
