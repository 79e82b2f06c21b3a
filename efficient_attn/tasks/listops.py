"""ListOps (Nangia & Bowman 2018) with Long Range Arena's generator (Tay et al. 2020).

A sample is a random expression tree written in prefix form with brackets, e.g.

    [MAX 4 3 [MIN 2 3 ] 1 0 [MEDIAN 1 5 8 9 2 ] ]   ->   label 5

Operators (LRA's set): MIN, MAX, MED (``int`` of the median, i.e. floor of the mean of the
two middle values for an even count), SM (sum modulo 10); values are the digits 0-9; the
label is the value of the whole expression (10 classes).

Tree law (LRA's ``generate_tree``): the root is at depth 1; a node above ``max_depth`` is a
leaf with probability ``leaf_prob`` = 0.75, otherwise an operator with ``randint(2, max_args)``
children (both ends included, uniform); a node at ``max_depth`` is always a leaf. The operator
and every leaf digit are uniform. A tree is kept if its token count is strictly between
``min_length`` and ``max_length`` (= ``seq_len``) and it was not drawn before: samples are
distinct across train, val and test together (LRA deduplicates too).

Tokens (one id per token, LRA strips the parentheses of its text format): 0 = pad,
1..10 = digits 0..9, 11..14 = MIN, MAX, MED, SM, 15 = ``]``. ``vocab_size`` = 16. Sequences
are left-aligned and padded with 0 to ``seq_len``; ``mask`` is True on the real tokens.

Defaults are LRA's (max_depth 10, max_args 10, leaf_prob 0.75) except the lengths: LRA uses
500 < length < 2000 at ``seq_len`` 2000; here ``max_length`` is ``seq_len`` and ``min_length``
defaults to ``seq_len // 4`` (LRA's ratio), so short presets keep the same shape of task.

Cost: a tree is generated in O(its length) and abandoned as soon as it reaches
``max_length`` tokens (it would be rejected anyway, so the law of the kept trees is
unchanged); the rejection rate depends on the length window (see the tests / report).
Randomness: ``random.Random`` driven only through ``random()`` (whose stream is stable across
Python versions), seeded from ``SeedSequence([seed, crc32("listops/...")])``.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from efficient_attn.core import check_config, check_positive_int
from efficient_attn.tasks.base import TaskData
from efficient_attn.tasks.common import python_seed, three_splits

NAME = "listops"
VERSION = 1  # bump when the generated arrays change for the same parameters

PAD = 0
DIGIT0 = 1  # digit d has id DIGIT0 + d
OPERATORS = ("MIN", "MAX", "MED", "SM")
OP0 = 11  # operator i has id OP0 + i
CLOSE = 15
VOCAB_SIZE = 16
NUM_CLASSES = 10
TOKEN_NAMES = ("<pad>",) + tuple(str(d) for d in range(10)) + tuple("[" + o for o in OPERATORS) + ("]",)


@dataclasses.dataclass(frozen=True)
class ListOpsConfig:
    """Generator parameters (LRA's defaults; ``min_length`` None = ``seq_len // 4``)."""

    max_depth: int = 10
    max_args: int = 10
    leaf_prob: float = 0.75
    min_length: int | None = None
    max_attempts: int = 10_000_000  # total trees drawn before giving up (clear error)

    def __post_init__(self):
        check_positive_int(NAME, "max_depth", self.max_depth)
        check_positive_int(NAME, "max_args", self.max_args, minimum=2)
        check_config(
            NAME,
            isinstance(self.leaf_prob, (int, float)) and 0.0 <= self.leaf_prob < 1.0,
            f"leaf_prob must be in [0, 1), got {self.leaf_prob!r}",
        )
        if self.min_length is not None:
            check_positive_int(NAME, "min_length", self.min_length, minimum=0)
        check_positive_int(NAME, "max_attempts", self.max_attempts)

    def resolve(self, seq_len: int) -> "ListOpsConfig":
        """The same config with ``min_length`` filled in for this ``seq_len``."""
        min_length = seq_len // 4 if self.min_length is None else self.min_length
        check_config(
            NAME,
            min_length + 1 < seq_len,
            f"need min_length + 1 < seq_len (lengths are strictly between), got "
            f"min_length={min_length}, seq_len={seq_len}",
        )
        return dataclasses.replace(self, min_length=min_length)


class _TooLong(Exception):
    """Raised inside the recursion once a tree reaches ``max_length`` tokens."""


def _median(values: list[int]) -> int:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2


def apply_op(op: int, values: list[int]) -> int:
    """Value of operator index ``op`` (into OPERATORS) on its children's values."""
    if op == 0:
        return min(values)
    if op == 1:
        return max(values)
    if op == 2:
        return _median(values)
    return sum(values) % 10


def sample_tree(rnd: random.Random, cfg: ListOpsConfig, max_length: int) -> tuple[list[int], int] | None:
    """One tree as (token ids, value), or None if it reached ``max_length`` tokens."""
    out: list[int] = []
    draw = rnd.random
    leaf_prob, max_depth, max_args = cfg.leaf_prob, cfg.max_depth, cfg.max_args

    def node(depth: int) -> int:
        if depth >= max_depth or draw() < leaf_prob:
            d = int(draw() * 10)
            out.append(DIGIT0 + d)
            if len(out) >= max_length:
                raise _TooLong
            return d
        num_children = 2 + int(draw() * (max_args - 1))  # uniform on {2, ..., max_args}
        op = int(draw() * len(OPERATORS))
        out.append(OP0 + op)
        values = [node(depth + 1) for _ in range(num_children)]
        out.append(CLOSE)
        if len(out) >= max_length:
            raise _TooLong
        return apply_op(op, values)

    try:
        value = node(1)
    except _TooLong:
        return None
    return out, value


def generate(cfg: ListOpsConfig, *, seq_len: int, num_train: int, num_val: int, num_test: int, seed: int) -> TaskData:
    """Distinct trees with ``min_length < length < seq_len``, padded to ``seq_len``."""
    cfg = cfg.resolve(seq_len)
    total = num_train + num_val + num_test
    rnd = random.Random(python_seed(NAME, seed))
    seen: set[bytes] = set()
    inputs = np.zeros((total, seq_len), dtype=np.int32)
    labels = np.zeros((total,), dtype=np.int32)
    lengths = np.zeros((total,), dtype=np.int64)
    n = attempts = 0
    while n < total:
        attempts += 1
        if attempts > cfg.max_attempts:
            raise RuntimeError(
                f"listops: only {n} of {total} distinct trees with {cfg.min_length} < length < {seq_len} "
                f"after {cfg.max_attempts} draws; widen the length window or raise max_attempts"
            )
        tree = sample_tree(rnd, cfg, seq_len)
        if tree is None:
            continue
        tokens, value = tree
        if len(tokens) <= cfg.min_length:
            continue
        key = bytes(tokens)  # ids < 256
        if key in seen:
            continue
        seen.add(key)
        inputs[n, : len(tokens)] = tokens
        labels[n] = value
        lengths[n] = len(tokens)
        n += 1
    mask = inputs != PAD
    train, val, test = three_splits(inputs, labels, mask, num_train, num_val)
    params = dataclasses.asdict(cfg)
    params.update(max_length=seq_len, stats={"draws": attempts, "mean_length": float(lengths.mean())})
    return TaskData(
        name=NAME,
        kind="classify",
        causal=False,
        vocab_size=VOCAB_SIZE,
        num_classes=NUM_CLASSES,
        seq_len=seq_len,
        train=train,
        val=val,
        test=test,
        metric="accuracy",
        params=params,
    )


def detokenize(ids) -> str:
    """Readable text of a token row (padding dropped), e.g. ``[MAX 4 [SM 1 2 ] ]``."""
    return " ".join(TOKEN_NAMES[int(i)] for i in ids if int(i) != PAD)
