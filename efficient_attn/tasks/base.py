"""What every task generator returns: a ``TaskData`` of integer token arrays, split three ways.

kind = "classify": one label per sequence, ``targets`` int32 ``[N]`` in ``[0, num_classes)``.
kind = "token":    one label per position, ``targets`` int32 ``[N, L]``, ``IGNORE`` (-1) where
                   no prediction is scored (MQAR scores only the query positions; bytes_lm
                   scores every real next byte).
``mask`` is bool ``[N, L]``: True = a real token, False = padding (passed on as the key mask).
``causal`` says whether a model for this task must be causal (a next-token task would read
its own answer through a bidirectional attention); non-causal variants are skipped there.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE = -1


@dataclasses.dataclass(frozen=True)
class Split:
    inputs: np.ndarray  # int32 [N, L]
    targets: np.ndarray  # int32 [N] (classify) or [N, L] (token)
    mask: np.ndarray  # bool [N, L]

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
