"""Batches: which examples a training step takes (``batch_indices``: a pure function of
(seed, step), so that a resumed run sees the data of an uninterrupted one) and the ``Batch``
the compiled steps take (``make_batch``: rows of a split, padded to the compiled size with
zero-weight rows).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.tasks.base import IGNORE, Split


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the training batch at ``step``: a pure function of ``(n, batch, step, seed)``."""
    g = step * batch_size + np.arange(batch_size)
    epochs, pos = g // n, g % n
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _permutation(n, seed, int(e))[pos[sel]]
    return out


class Batch(NamedTuple):
    """One batch as the compiled steps take it (a pytree; ``positions`` None = every position)."""

    tokens: Int[Array, "B L"]
    mask: Bool[Array, "B L"]
    targets: Int[Array, " B"] | Int[Array, "B L"] | Int[Array, "B K"]  # classify | token | token at positions
    weights: Float[Array, " B"]  # 0 on the rows that only pad the batch to its fixed size
    positions: Int[Array, "B K"] | None = None
    segment_ids: Int[Array, "B L"] | None = None  # packed rows (the split's segment_ids); None = unpacked


def make_batch(split: Split, idx: np.ndarray, *, rows: int, scored: int | None = None) -> Batch:
    """The rows ``idx`` of ``split``, padded to ``rows`` with zero-weight rows. With ``scored``
    = K, the targets are cut to each row's first K scored positions (the rest IGNORE) and those
    positions come as ``positions`` ``[rows, K]``. A packed split's ``segment_ids`` come along."""
    pad = rows - len(idx)
    take = np.concatenate([idx, np.zeros(pad, idx.dtype)]) if pad else idx
    tokens = np.asarray(split.inputs)[take].astype(np.int32)
    mask = np.asarray(split.mask)[take].astype(bool)
    targets = np.asarray(split.targets)[take].astype(np.int32)
    segments = None if split.segment_ids is None else np.asarray(split.segment_ids)[take].astype(np.int32)
    weights = np.ones(rows, np.float32)
    if pad:
        weights[len(idx):] = 0.0
    if scored is None:
        return Batch(tokens, mask, targets, weights, segment_ids=segments)
    positions = np.argsort(targets == IGNORE, axis=1, kind="stable")[:, :scored].astype(np.int32)
    return Batch(tokens, mask, np.take_along_axis(targets, positions, axis=1), weights, positions, segments)
