"""The memory a variant keeps to produce the next token, per layer and per sequence, in floats.

Measured, not declared: for a variant with the decoding capability (``decode``), the floating
arrays of an empty ``init_state(batch=1, max_len=N)`` (their sizes never change while
decoding): a KV cache's 2 N H d, a window's 2 w H d ring buffer, a recurrent state's H d d_v
plus whatever the variant carries. For a variant without it, the size of a KV cache,
2 N H d, is reported as an upper bound (any causal attention can be decoded by keeping
every key and value) and labelled so: its true state may be smaller (a window's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.registry import build, get_spec

__all__ = ["DECODE", "KV_BOUND", "state_floats"]

DECODE = "decode state"
KV_BOUND = "KV-cache bound"


def state_floats(variant: str, kwargs: tuple, *, num_heads: int, head_dim: int, max_len: int) -> tuple[int, str]:
    """(floats kept per layer and sequence, how it was found: ``DECODE`` or ``KV_BOUND``)."""
    if get_spec(variant).capabilities.decode:
        core = build(variant, num_heads=num_heads, head_dim=head_dim, max_len=max_len, rngs=nnx.Rngs(0),
                     **dict(kwargs))
        try:
            shapes = jax.eval_shape(lambda: core.init_state(1, max_len).data)
        except NotImplementedError:  # declared but not implemented yet: the bound below
            pass
        else:
            leaves = [x for x in jax.tree.leaves(shapes) if jnp.issubdtype(x.dtype, jnp.floating)]
            return int(sum(x.size for x in leaves)), DECODE
    return 2 * max_len * num_heads * head_dim, KV_BOUND
