"""MQAR's evaluation mixture (``eval_num_pairs``) and its per-row pair counts (``eval_groups``)."""

from __future__ import annotations

import numpy as np
import pytest

from efficient_attn import tasks
from efficient_attn.tasks.base import IGNORE

ARGS = dict(seq_len=64, num_train=24, num_val=12, num_test=16, vocab_size=64, num_pairs=4)


def test_eval_mixture_has_equal_shares_and_groups_read_the_pair_count():
    data = tasks.generate("mqar", seed=0, train_num_pairs=(4, 8), eval_num_pairs=(2, 4, 8, 16), **ARGS)
    for split, n in ((data.val, 12), (data.test, 16)):
        name, groups = tasks.eval_groups(data, split)
        assert name == "pairs" and groups.shape == (n,)
        assert np.bincount(groups, minlength=17)[[2, 4, 8, 16]].tolist() == [n // 4] * 4
        for row_in, row_tg, p in zip(split.inputs, split.targets, groups):
            # p pairs: keys at the even positions below 2p, each queried once, answered by its value
            keys, values = row_in[0:2 * p:2], row_in[1:2 * p:2]
            assert len(set(keys)) == p and (keys < 32).all() and (values >= 32).all()
            q = np.flatnonzero(row_tg != IGNORE)
            assert len(q) == p and (q >= 2 * p).all()
            lookup = dict(zip(keys, values))
            assert all(lookup[row_in[i]] == row_tg[i] for i in q)
    assert set(tasks.eval_groups(data, data.train)[1]) == {4, 8}
    assert tasks.bidirectional_safe("mqar") is True


def test_eval_mixture_is_deterministic_and_leaves_the_old_layouts_alone():
    a = tasks.generate("mqar", seed=3, eval_num_pairs=(2, 8), **ARGS)
    b = tasks.generate("mqar", seed=3, eval_num_pairs=(2, 8), **ARGS)
    np.testing.assert_array_equal(a.test.inputs, b.test.inputs)
    plain = tasks.generate("mqar", seed=3, **ARGS)
    assert set(tasks.eval_groups(plain, plain.test)[1]) == {4}  # without it: num_pairs everywhere


def test_eval_mixture_refusals():
    with pytest.raises(ValueError, match="eval_num_pairs"):
        tasks.generate("mqar", seed=0, eval_num_pairs=(4, 32), **ARGS)  # 4 * 32 > 64
    with pytest.raises(ValueError, match="must not repeat"):
        tasks.generate("mqar", seed=0, eval_num_pairs=(4, 4), **ARGS)
