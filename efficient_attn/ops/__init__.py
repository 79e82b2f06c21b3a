"""Shared engines the variants compose; no variant re-implements one.

masks.py             visibility of (query, key) pairs from a Mask; the masked softmax that
                     gives zero rows (never NaN) where nothing is visible
online_softmax.py    exact blockwise softmax attention with a recomputing custom_vjp
                     (blockwise, and the exact path of the models)
block_sparse.py      attention over a static table of key blocks per query block
                     (local, sparse_transformer, longformer, bigbird, reformer's chunks)
linear_attention.py  phi(Q) (phi(K)^T V): reassociated, or causal by chunk-parallel prefix
                     states (linear, performer, cosformer)

Each engine has a naive twin in tests/ that it is checked against, forward and backward.
"""
