"""Selective copying (MAD: Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid
Architectures", arXiv 2403.17844; the task of Gu & Dao 2023, "Mamba", sec. 3.1): copy, in
order, the few content tokens scattered among noise, then emit them after a marker.

Layout of one sequence of length L with K tokens to copy (D = L - K - 1 data slots):

    positions 0 .. D-1:    noise, except K distinct positions p_1 < ... < p_K drawn uniformly
                           (all K-subsets equally likely), which hold c_1 .. c_K
    position  D:           the copy marker
    positions D+1 .. L-1:  c_1 .. c_K again (teacher forcing: the answer so far is the input,
                           as a language model is trained)
    targets:               c_j at position D + j - 1 (the marker predicts c_1, c_j predicts
                           c_{j+1}); IGNORE elsewhere, including position L-1

Token ids (``vocab_size`` V, ``noise_tokens`` n): noise 0 .. n-1 (uniform), the marker n,
content n+1 .. V-1 (each c_j uniform and independent: repeats happen, so a model cannot find
c_{j+1} by looking up where its input c_j occurred; it must count content tokens). Defaults:
MAD's point (L = 256, K = 16, V = 16, one noise token), so there are 14 content values.

Why it separates mixers: the content positions are random, so a fixed convolution or a
position-only rule cannot find them; the model must select by content (is this a noise
token?) and keep K tokens in order in its state, which a recurrence of a fixed size holds only
as far as its state lets it (Gu & Dao 2023, sec. 3.1; MAD sec. 3.1).

Causality: the answer is in the input (positions D+1 ..), so a bidirectional model would read
c_{j+1} one position ahead: the task is ``causal=True`` and ``BIDIRECTIONAL_SAFE = False``.
``kind="token"``, ``metric="accuracy"`` over the K scored positions of each row; no padding.
Cost O(N L) time, numpy-vectorised; deterministic given the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from efficient_attn.core import check_config, check_positive_int
from efficient_attn.tasks.base import IGNORE, TaskData
from efficient_attn.tasks.common import rng, three_splits

NAME = "selective_copy"
VERSION = 1
BIDIRECTIONAL_SAFE = False  # the answers are in the input (teacher forcing): a bidirectional model reads them


@dataclasses.dataclass(frozen=True)
class SelectiveCopyConfig:
    """Generator parameters (MAD's defaults)."""

    vocab_size: int = 16
    num_tokens: int = 16  # K, the tokens to copy
    noise_tokens: int = 1  # distinct noise ids

    def __post_init__(self):
        check_positive_int(NAME, "num_tokens", self.num_tokens)
        check_positive_int(NAME, "noise_tokens", self.noise_tokens)
        check_positive_int(NAME, "vocab_size", self.vocab_size, minimum=1)
        check_config(
            NAME,
            self.vocab_size >= self.noise_tokens + 3,
            f"vocab_size={self.vocab_size} must hold {self.noise_tokens} noise id(s), the marker and at least 2 "
            f"content ids: use vocab_size >= {self.noise_tokens + 3}",
        )

    @property
    def marker(self) -> int:
        return self.noise_tokens

    @property
    def first_content(self) -> int:
        return self.noise_tokens + 1


def _check_fits(K: int, L: int) -> None:
    check_config(
        NAME,
        L >= 2 * K + 1,
        f"seq_len={L} must be >= 2 * num_tokens + 1 = {2 * K + 1} (K data tokens among at least K data slots, "
        f"the marker, K copies); use num_tokens <= {(L - 1) // 2}",
    )


def _positions(gen: np.random.Generator, n: int, slots: int, k: int) -> np.ndarray:
    """``n`` rows of ``k`` distinct sorted positions in ``[0, slots)``, every k-subset equally
    likely (the k smallest ranks of i.i.d. uniform keys are a uniform random subset)."""
    keys = gen.random((n, slots))
    return np.sort(np.argpartition(keys, k - 1, axis=1)[:, :k], axis=1)


def generate(cfg: SelectiveCopyConfig, *, seq_len: int, num_train: int, num_val: int, num_test: int,
             seed: int) -> TaskData:
    """Rows of the layout in the module docstring; train, val and test drawn alike."""
    K, L, V = cfg.num_tokens, seq_len, cfg.vocab_size
    _check_fits(K, L)
    D = L - K - 1
    n = num_train + num_val + num_test
    gen = rng(NAME, seed)
    content = gen.integers(cfg.first_content, V, size=(n, K), dtype=np.int64)
    where = _positions(gen, n, D, K)
    inputs = np.empty((n, L), dtype=np.int64)
    inputs[:, :D] = gen.integers(0, cfg.noise_tokens, size=(n, D), dtype=np.int64)
    np.put_along_axis(inputs, where, content, axis=1)
    inputs[:, D] = cfg.marker
    inputs[:, D + 1:] = content
    targets = np.full((n, L), IGNORE, dtype=np.int64)
    targets[:, D:D + K] = content
    mask = np.ones((n, L), dtype=bool)
    train, val, test = three_splits(inputs, targets, mask, num_train, num_val)
    return TaskData(
        name=NAME,
        kind="token",
        causal=True,
        vocab_size=V,
        num_classes=V,
        seq_len=L,
        train=train,
        val=val,
        test=test,
        metric="accuracy",
        params=dataclasses.asdict(cfg),
    )
