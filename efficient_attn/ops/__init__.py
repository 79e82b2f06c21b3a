"""Shared engines the variants compose; no variant re-implements one.

masks.py             visibility of (query, key) pairs from a Mask; the masked softmax that
                     gives zero rows (never NaN) where nothing is visible
online_softmax.py    exact blockwise softmax attention with a recomputing custom_vjp
                     (blockwise, and the exact path of the models)
block_sparse.py      attention over a static table of key blocks per query block
                     (local, sparse_transformer, longformer, bigbird, reformer's chunks)
linear_attention.py  phi(Q) (phi(K)^T V): reassociated, or causal by chunk-parallel prefix
                     states (linear, performer, cosformer, based)
gated_linear.py      chunked gated recurrences S_t = diag(a_t) S_{t-1} + k_t v_t^T with decays
                     in log space (retnet, gla, mamba2)
delta_rule.py        the chunked delta rule (WY / UT transform), optionally gated
                     (deltanet, gated_deltanet)
permute.py           take_rows / inverse_permutation: the sorts by bucket or segment id and
                     their undoing (reformer, packed linear attention)
feature_norms.py     l2_normalise (delta rule's q, k) and rms_normalise (GLA's gate input)
reference/           one readable reference per engine (dense, quadratic or token by token);
                     tests/ops/ checks every engine against it, forward and backward
"""
