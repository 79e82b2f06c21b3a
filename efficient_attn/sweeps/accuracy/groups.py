"""Test accuracy per group of rows, for tasks that declare a grouping (``tasks.eval_groups``;
MQAR: the number of key-value pairs in the row), computed once after training with the
best-validation model that ``train.train`` returns.

A group's accuracy is its correct predictions over its scored targets (MQAR: queries), the
same count ``train.loss_sums`` makes for the whole split, so the groups' totals add up to the
split's accuracy (a test checks it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_attn.tasks.base import IGNORE, Split, TaskData
from efficient_attn.train import forward, make_batch, model_accepts, scored_positions

__all__ = ["per_row_counts", "grouped_accuracy"]


def per_row_counts(model: nnx.Module, data: TaskData, split: Split, *, batch_size: int,
                   use_mask: bool) -> tuple[np.ndarray, np.ndarray]:
    """(correct, scored) per row of ``split``: for a token task the row's scored positions and
    how many of them the model's argmax gets right; for a classification task 1 and 0/1."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    scored = scored_positions(data) if "positions" in model_accepts(model) else None
    token = data.kind == "token"

    @jax.jit
    def counts(params, rest, batch):
        logits, _ = forward(graphdef, params, rest, batch, use_mask=use_mask)
        hit = jnp.argmax(logits, axis=-1) == jnp.where(batch.targets == IGNORE, 0, batch.targets)
        if not token:
            return hit.astype(jnp.float32), jnp.ones(hit.shape, jnp.float32)
        w = (batch.targets != IGNORE).astype(jnp.float32)
        return (hit * w).sum(axis=1), w.sum(axis=1)

    n = len(split)
    correct, total = np.zeros(n), np.zeros(n)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        c, t = counts(params, rest, make_batch(split, idx, rows=batch_size, scored=scored))
        correct[idx], total[idx] = np.asarray(c)[: len(idx)], np.asarray(t)[: len(idx)]
    return correct, total


def grouped_accuracy(model: nnx.Module, data: TaskData, split: Split, groups: np.ndarray, *, batch_size: int,
                     use_mask: bool) -> dict[int, float]:
    """Accuracy of ``model`` on the rows of each group (``groups``: one integer per row)."""
    groups = np.asarray(groups)
    if groups.shape != (len(split),):
        raise ValueError(f"groups must give one integer per row of the split ({len(split)}), got shape {groups.shape}")
    correct, total = per_row_counts(model, data, split, batch_size=batch_size, use_mask=use_mask)
    return {int(g): float(correct[groups == g].sum() / max(total[groups == g].sum(), 1.0)) for g in np.unique(groups)}
