"""Readable references of the engines, one module per engine (as fla keeps ``naive.py`` beside
``chunk.py``): dense, token-by-token or quadratic forms that are slow on purpose and obviously
right. The tests compare every engine with its reference forward and backward. The
approximation experiment measures every variant against the exact ``full`` variant (itself
tested against ``softmax``); for shared-QK variants it takes the keys and the "not self
unless alone" mask from ``lsh`` (``shared_qk_keys``, ``not_self_unless_alone``), so that what
it measures them against is ``lsh.shared_qk_attention``. Nothing here is used on a fast path.
"""
