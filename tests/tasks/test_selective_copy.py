"""The selective-copying generator (tasks/selective_copy.py): its layout read back row by row,
the law of positions and contents, determinism, the cache, and clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from efficient_attn import tasks
from efficient_attn.tasks import selective_copy as sc
from efficient_attn.tasks.base import IGNORE

SMALL = dict(seq_len=48, num_train=40, num_val=6, num_test=6)


def _read_back(row_in, row_tg, K, noise, V):
    """An independent reading of one row: (content tokens in data order, scored targets)."""
    L = row_in.shape[0]
    D = L - K - 1
    data = row_in[:D]
    assert sc.SelectiveCopyConfig(V, K, noise).marker not in data  # the marker id is never noise or content
    content = data[data >= noise]  # ids below ``noise`` are noise
    assert row_in[D] == noise  # the marker
    scored = row_tg[row_tg != IGNORE]
    assert np.flatnonzero(row_tg != IGNORE).tolist() == list(range(D, D + K))
    return content, scored


@pytest.mark.parametrize("noise", [1, 3])
def test_layout_row_by_row(noise):
    K, V = 6, 10
    data = tasks.generate("selective_copy", seed=1, num_tokens=K, vocab_size=V, noise_tokens=noise, **SMALL)
    assert (data.kind, data.causal, data.metric, data.vocab_size, data.num_classes) == ("token", True, "accuracy", V, V)
    for split in (data.train, data.val, data.test):
        assert split.mask.all()
        for row_in, row_tg in zip(split.inputs, split.targets):
            content, scored = _read_back(row_in, row_tg, K, noise, V)
            assert len(content) == K and (content >= noise + 1).all() and (content < V).all()
            np.testing.assert_array_equal(scored, content)  # copied in order
            np.testing.assert_array_equal(row_in[-K:], content)  # teacher forcing: the answer as input
            # the input at a scored position is never its target's token by construction of the
            # layout (marker, then the previous token): the target is one step ahead
            D = len(row_in) - K - 1
            np.testing.assert_array_equal(row_in[D + 1:], row_tg[D:D + K])


def test_positions_and_contents_follow_their_law():
    K, L = 4, 40
    data = tasks.generate("selective_copy", seq_len=L, num_train=3000, num_val=0, num_test=0, seed=2,
                          num_tokens=K, vocab_size=8)
    D = L - K - 1
    rows = data.train.inputs[:, :D]
    pos = np.argwhere(rows >= 2)[:, 1]  # content ids start at 2 with one noise id
    assert pos.size == 3000 * K
    # every data slot equally likely: counts per slot within 5 standard deviations of the mean
    counts = np.bincount(pos, minlength=D)
    expected = 3000 * K / D
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)
    # content ids uniform over [2, 8), drawn independently (repeats within a row happen)
    values = data.train.targets[data.train.targets != IGNORE]
    vc = np.bincount(values, minlength=8)[2:]
    assert np.abs(vc - values.size / 6).max() < 5 * np.sqrt(values.size / 6)
    scored = data.train.targets[:, D:D + K]
    assert any(len(set(r)) < K for r in scored)


def test_deterministic_given_seed_and_cached(tmp_path):
    a = tasks.generate("selective_copy", seed=4, **SMALL)
    b = tasks.load("selective_copy", seed=4, cache_dir=tmp_path, **SMALL)
    c = tasks.load("selective_copy", seed=4, cache_dir=tmp_path, **SMALL)  # from the cache file
    d = tasks.generate("selective_copy", seed=5, **SMALL)
    assert list(tmp_path.rglob("*.npz"))
    for name in ("train", "val", "test"):
        for x in (b, c):
            np.testing.assert_array_equal(getattr(a, name).inputs, getattr(x, name).inputs)
            np.testing.assert_array_equal(getattr(a, name).targets, getattr(x, name).targets)
    assert not np.array_equal(a.train.inputs, d.train.inputs)


def test_declarations_for_experiments():
    assert "selective_copy" in tasks.TASKS
    assert tasks.bidirectional_safe("selective_copy") is False  # the answers are in the input
    assert tasks.parameters("selective_copy") == {"vocab_size": 16, "num_tokens": 16, "noise_tokens": 1}
    data = tasks.generate("selective_copy", seed=0, **SMALL)
    assert tasks.eval_groups(data, data.test) is None


def test_refusals_name_the_problem_and_the_fix():
    with pytest.raises(ValueError, match=r"seq_len=20 must be >= 2 \* num_tokens \+ 1 = 33.*num_tokens <= 9"):
        tasks.generate("selective_copy", seq_len=20, num_train=2, num_val=0, num_test=0, num_tokens=16)
    with pytest.raises(ValueError, match="vocab_size >= 5"):
        tasks.generate("selective_copy", seq_len=64, num_train=2, num_val=0, num_test=0, vocab_size=4,
                       noise_tokens=2)
    with pytest.raises(ValueError, match="num_tokens"):
        tasks.generate("selective_copy", seq_len=64, num_train=2, num_val=0, num_test=0, num_tokens=0)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['tokens'\]"):
        tasks.generate("selective_copy", seq_len=64, num_train=2, num_val=0, num_test=0, tokens=3)
