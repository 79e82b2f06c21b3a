"""Helpers every task generator shares: argument checks, seeded RNGs, split assembly.

Kept apart from ``base.py`` (the data contract) and ``__init__.py`` (the public entry point)
so that generators import nothing but this and the contract.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import numpy as np

from efficient_attn.core import check_config, check_positive_int
from efficient_attn.tasks.base import Split


def check_counts(task: str, seq_len: Any, num_train: Any, num_val: Any, num_test: Any, seed: Any) -> None:
    """Validate the arguments every generator takes (clear message naming the bad value)."""
    check_positive_int(task, "seq_len", seq_len, minimum=2)
    check_positive_int(task, "num_train", num_train, minimum=1)
    check_positive_int(task, "num_val", num_val, minimum=0)
    check_positive_int(task, "num_test", num_test, minimum=0)
    check_positive_int(task, "seed", seed, minimum=0)


def build_config(task: str, cls: type, params: dict) -> Any:
    """``cls(**params)``, but an unknown name raises a ``ValueError`` listing the valid ones."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(valid))
    check_config(
        task,
        not unknown,
        f"unknown parameter(s) {unknown}; valid parameters of {task} are {valid}",
    )
    return cls(**params)


def rng(task: str, seed: int, stream: str = "") -> np.random.Generator:
    """A numpy Generator that depends only on (task, seed, stream): PCG64 via SeedSequence."""
    key = zlib.crc32(f"{task}/{stream}".encode())
    return np.random.default_rng(np.random.SeedSequence([int(seed), key]))


def python_seed(task: str, seed: int, stream: str = "") -> int:
    """A 64-bit integer seed for ``random.Random`` drawn from ``rng(task, seed, stream)``."""
    return int(rng(task, seed, stream).integers(0, 2**63 - 1))


def make_split(inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> Split:
    """A ``Split`` with the contract's dtypes (int32 inputs/targets, bool mask), C-contiguous."""
    return Split(
        inputs=np.ascontiguousarray(inputs, dtype=np.int32),
        targets=np.ascontiguousarray(targets, dtype=np.int32),
        mask=np.ascontiguousarray(mask, dtype=bool),
    )


def three_splits(
    inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray, num_train: int, num_val: int
) -> tuple[Split, Split, Split]:
    """Cut row-aligned arrays into train ``[:num_train]``, val (next ``num_val``), test (the rest)."""
    a, b = num_train, num_train + num_val
    return (
        make_split(inputs[:a], targets[:a], mask[:a]),
        make_split(inputs[a:b], targets[a:b], mask[a:b]),
        make_split(inputs[b:], targets[b:], mask[b:]),
    )
