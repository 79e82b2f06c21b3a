"""Readable references of the engines, one module per engine (as fla keeps ``naive.py`` beside
``chunk.py``): dense, token-by-token or quadratic forms that are slow on purpose and obviously
right. The tests compare every engine with its reference forward and backward; the
approximation experiment measures against them. Nothing here is used on a fast path.
"""
