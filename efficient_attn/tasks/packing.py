"""Packed rows: several examples of a token task concatenated into one row, with segment ids.

    from efficient_attn import tasks
    from efficient_attn.tasks.packing import pack_task
    data = tasks.load("mqar", seq_len=64, ...)          # examples of 64 tokens
    packed = pack_task(data, length=256)               # rows of 256: four examples each

The convention (``pack``):

- Examples are taken in their split's order and laid end to end (next fit: an example that
  does not fit in what is left of a row starts the next row; none is cut or reordered).
  An example's length is its count of real tokens; its mask must be a prefix (right padding),
  as the generators write it.
- ``segment_ids[r, t]`` is the index, within row r, of the example that position t holds:
  0, 0, ..., 1, 1, ..., sorted. The padding after a row's last example gets an id of its own
  (one past the last example's), ``mask`` False, input 0 and target ``IGNORE``.
- Each example keeps its own inputs and targets at its own positions: a target is always the
  example's own next token (or ``IGNORE``), so no target crosses a segment boundary, the first
  token of an example is never the target of the previous example's last, and the positions
  scored per example are exactly those the unpacked task scores.
- What a model owes a packed row (``nn.CausalLM`` with ``segment_ids``): attention only
  within a segment, positions restarting at 0 at each segment start, and no mixing of
  segments in any other layer (the short convolution). Then every example's logits are those
  it would get alone, and the mean loss over a packed batch is the token-weighted mean of the
  examples' losses.

Only token tasks that declare ``PACKABLE = True`` in their module (bytes_lm, mqar: each
position's target is a function of the example alone) are packed by ``pack_task``; a
classification task has one label per row and cannot be.
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np

from efficient_attn.core import check_positive_int
from efficient_attn.tasks.base import IGNORE, Split, TaskData

__all__ = ["pack", "pack_task", "packable", "example_lengths"]


def example_lengths(split: Split) -> np.ndarray:
    """Each row's count of real tokens; ``ValueError`` unless every mask is a prefix (right padding)."""
    mask = np.asarray(split.mask, bool)
    lengths = mask.sum(axis=1)
    prefix = np.arange(mask.shape[1])[None, :] < lengths[:, None]
    if not (prefix == mask).all():
        row = int(np.argmax((prefix != mask).any(axis=1)))
        raise ValueError(f"pack: row {row}'s mask is not a prefix of True (left or inner padding); packing lays "
                         "real tokens end to end and needs right-padded examples")
    if split.segment_ids is not None:
        raise ValueError("pack: this split is already packed (it has segment_ids); pack the unpacked split")
    return lengths.astype(np.int64)


def _rows_of(lengths: np.ndarray, length: int, max_per_row: int | None) -> list[list[int]]:
    """Next fit: the example indices of each row, in order."""
    rows, current, used = [], [], 0
    for i, n in enumerate(lengths.tolist()):
        if current and (used + n > length or (max_per_row is not None and len(current) == max_per_row)):
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def pack(split: Split, length: int, *, max_per_row: int | None = None) -> Split:
    """``split``'s examples packed into rows of ``length`` tokens (module docstring), with
    ``segment_ids``. ``max_per_row=1`` gives one example a row (padded to ``length``), the
    unpacked layout at the packed length."""
    check_positive_int("pack", "length", length)
    if max_per_row is not None:
        check_positive_int("pack", "max_per_row", max_per_row)
    lengths = example_lengths(split)
    if lengths.size and lengths.max() > length:
        i = int(np.argmax(lengths))
        raise ValueError(f"pack: example {i} has {int(lengths[i])} tokens, more than a row of length={length}; "
                         f"pack into rows of at least {int(lengths.max())} (examples are never cut)")
    inputs, targets = np.asarray(split.inputs), np.asarray(split.targets)
    if targets.shape != inputs.shape:
        raise ValueError(f"pack: targets {list(targets.shape)} must be per position like the inputs "
                         f"{list(inputs.shape)}; only token tasks can be packed (a class label belongs to a whole row)")
    rows = _rows_of(lengths, length, max_per_row)
    R = len(rows)
    out_in = np.zeros((R, length), np.int32)
    out_tg = np.full((R, length), IGNORE, np.int32)
    out_mask = np.zeros((R, length), bool)
    out_seg = np.zeros((R, length), np.int32)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            n = int(lengths[i])
            out_in[r, at:at + n] = inputs[i, :n]
            out_tg[r, at:at + n] = targets[i, :n]
            out_mask[r, at:at + n] = True
            out_seg[r, at:at + n] = s
            at += n
        out_seg[r, at:] = len(members)  # the padding: an id of its own, after the last example
    return Split(out_in, out_tg, out_mask, out_seg)


def packable(name: str) -> bool:
    """Whether task ``name`` declares its examples packable (its module's ``PACKABLE``)."""
    try:
        module = importlib.import_module(f"efficient_attn.tasks.{name}")
    except ImportError:
        return False
    return bool(getattr(module, "PACKABLE", False))


def pack_task(data: TaskData, length: int, *, pack_eval: bool = True) -> TaskData:
    """``data`` with every split packed into rows of ``length`` (``seq_len`` becomes ``length``).

    ``pack_eval=False`` packs only the training split and gives validation and test one
    example a row (padded to ``length``, with segment ids), so that a per-row grouping of the
    scores (MQAR's pairs per row, ``tasks.eval_groups``) still names one example."""
    if data.kind != "token" or not packable(data.name):
        raise ValueError(f"task {data.name!r} (kind {data.kind!r}) is not packable: only token tasks whose module "
                         "declares PACKABLE = True (bytes_lm, mqar) are; train it unpacked (pack=False)")
    if not isinstance(pack_eval, bool):
        raise ValueError(f"pack_task: pack_eval must be True or False, got {pack_eval!r}")
    splits = {"train": pack(data.train, length)}
    for name in ("val", "test"):
        splits[name] = pack(getattr(data, name), length, max_per_row=None if pack_eval else 1)
    params = dict(data.params, packed={"example_len": data.seq_len, "length": int(length), "pack_eval": pack_eval})
    return dataclasses.replace(data, seq_len=int(length), params=params, **splits)
