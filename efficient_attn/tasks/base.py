"""What every task generator returns: a ``TaskData`` of integer token arrays, split three ways.

kind = "classify": one label per sequence, ``targets`` int32 ``[N]`` in ``[0, num_classes)``.
kind = "token":    one label per position, ``targets`` int32 ``[N, L]``, ``IGNORE`` (-1) where
                   no prediction is scored (MQAR scores only the query positions; bytes_lm
                   scores every real next byte).
``mask`` is bool ``[N, L]``: True = a real token, False = padding (passed on as the key mask).
``segment_ids`` (optional, int32 ``[N, L]``) marks packed rows (``tasks/packing.py``): several
examples share one row, each with its own id, sorted and starting at 0 in every row, and a
model must not let one example see another. None (the generators' output) = one example a row.
``causal`` says whether a model for this task must be causal (a next-token task would read
its own answer through a bidirectional attention); non-causal variants are skipped there.

A ``TaskData`` checks its arrays when it is made, whether by a generator or from the cache:
every input id in ``[0, vocab_size)``, every target in ``[0, num_classes)`` (or ``IGNORE`` for
a token task), shapes ``[N, seq_len]`` and a bool mask. An embedding lookup would otherwise
wrap or clamp a bad id silently; a ``ValueError`` naming the task, the split, the value and
its place is raised instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE = -1  # a token target that is not scored


@dataclasses.dataclass(frozen=True)
class Split:
    inputs: np.ndarray  # int32 [N, L]
    targets: np.ndarray  # int32 [N] (classify) or [N, L] (token)
    mask: np.ndarray  # bool [N, L]
    segment_ids: np.ndarray | None = None  # int32 [N, L] for packed rows (tasks/packing.py); None = unpacked

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclasses.dataclass(frozen=True)
class TaskData:
    name: str
    kind: str  # "classify" | "token"
    causal: bool
    vocab_size: int
    num_classes: int  # classify: label count; token: output vocabulary size
    seq_len: int
    train: Split
    val: Split
    test: Split
    metric: str = "accuracy"  # "accuracy" or "bits_per_byte"
    params: dict = dataclasses.field(default_factory=dict)  # the generator parameters

    def __post_init__(self):
        for name in ("train", "val", "test"):
            check_split(self, name)


def _check_range(task: str, split: str, what: str, a: np.ndarray, high: int, allowed: str,
                 ignore: bool = False) -> None:
    """``ValueError`` at the first value of ``a`` outside [0, high) (or IGNORE, when ``ignore``).
    Min and max first: the element-wise pass runs only when something is wrong."""
    low = IGNORE if ignore else 0  # IGNORE = -1 is the only integer in [-1, 0)
    if a.size == 0 or (a.min() >= low and a.max() < high):
        return
    bad = (a < low) | (a >= high)
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"task {task!r}, {split} split: {what} {int(a[where])} at index {where} is outside "
        f"{allowed} ({int(bad.sum())} such); a generator must yield only these values, and a cache file "
        "holding others is refused (delete it to regenerate)"
    )


def check_split(data: TaskData, name: str) -> None:
    """``ValueError`` naming the task and the split unless split ``name`` keeps the contract
    (module docstring): a cheap numpy pass over its arrays."""
    split: Split = getattr(data, name)
    inputs, targets, mask = (np.asarray(x) for x in (split.inputs, split.targets, split.mask))
    n = inputs.shape[0] if inputs.ndim else -1
    want = (n, data.seq_len)
    if inputs.shape != want or mask.shape != want or not np.issubdtype(inputs.dtype, np.integer):
        raise ValueError(
            f"task {data.name!r}, {name} split: inputs {inputs.dtype}{list(inputs.shape)} and mask "
            f"{list(mask.shape)} must both be [N, seq_len={data.seq_len}] with integer inputs"
        )
    if mask.dtype != np.bool_:
        raise ValueError(f"task {data.name!r}, {name} split: mask must be bool, got {mask.dtype}")
    target_shape = (n,) if data.kind == "classify" else want
    if targets.shape != target_shape or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"task {data.name!r}, {name} split: targets {targets.dtype}{list(targets.shape)} must be "
                         f"integers of shape {list(target_shape)} for kind {data.kind!r}")
    if split.segment_ids is not None:
        _check_segment_ids(data.name, name, np.asarray(split.segment_ids), want)
    _check_range(data.name, name, "token id", inputs, data.vocab_size, f"[0, vocab_size={data.vocab_size})")
    token = data.kind == "token"
    _check_range(data.name, name, "target", targets, data.num_classes,
                 f"[0, num_classes={data.num_classes})" + (f" or IGNORE={IGNORE}" if token else ""),
                 ignore=token)


def _check_segment_ids(task: str, split: str, seg: np.ndarray, want: tuple) -> None:
    """Packed rows' ids: integers of the inputs' shape, each row starting at 0 and never
    decreasing (the order packing writes and the attention's tile skipping relies on)."""
    if seg.shape != want or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"task {task!r}, {split} split: segment_ids {seg.dtype}{list(seg.shape)} must be integers "
                         f"of the inputs' shape {list(want)}")
    if seg.size == 0:
        return
    steps = np.diff(seg, axis=1)
    bad_rows = (seg[:, 0] != 0) | (steps < 0).any(axis=1)
    if bad_rows.any():
        row = int(np.argmax(bad_rows))
        raise ValueError(f"task {task!r}, {split} split: segment_ids of row {row} must start at 0 and never "
                         f"decrease (sorted, one id per packed example), got {seg[row][:16].tolist()}...; "
                         "make packed rows with tasks.packing.pack")
