"""``Mask``: which (query, key) pairs may interact; a registered pytree dataclass (``causal``
static, the arrays as data), so it passes through ``jit`` and ``vmap``.

``MASK_ARRAY_FIELDS`` names its array fields; ``validation.normalise_mask`` turns what a caller
gives into the ``Mask`` a variant's ``attend`` sees.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jaxtyping import Array, Bool, Int


MASK_ARRAY_FIELDS = ("kv_mask", "q_mask", "dense", "q_segment_ids", "kv_segment_ids")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=list(MASK_ARRAY_FIELDS),
    meta_fields=["causal"],
)
@dataclasses.dataclass(frozen=True)
class Mask:
    """Which (query, key) pairs may interact. A pytree: passes through ``jit`` and ``vmap``.

    causal:  query i sees only keys j <= i (self-attention, T == S).
    kv_mask: ``[B, S]`` bool, True = a real key; False keys are never attended to.
    q_mask:  ``[B, T]`` bool, True = a real query; outputs at False queries are zero.
    dense:   ``[B, H, T, S]`` bool (H and B may be 1 to broadcast), only for variants whose
             capabilities say ``dense_mask``.
    q_segment_ids / kv_segment_ids: ``[B, T]`` / ``[B, S]`` integers for packed sequences:
             a query sees only keys of its own segment (and, with ``causal``, only earlier
             ones of it). Given together, only for variants whose capabilities say
             ``segments``. Packing writes them sorted (0, 0, 1, 1, 1, 2, ...).

    A query that sees no key at all gets a zero output: never NaN, never mean(V).
    """

    causal: bool = False
    kv_mask: Bool[Array, "B S"] | None = None
    q_mask: Bool[Array, "B T"] | None = None
    dense: Bool[Array, "B H T S"] | None = None
    q_segment_ids: Int[Array, "B T"] | None = None
    kv_segment_ids: Int[Array, "B S"] | None = None
