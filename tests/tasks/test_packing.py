"""Packed rows: the packing convention (tasks/packing.py), a packed CausalLM forward equal to
each sequence alone, packed training's loss, and the refusals."""

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import efficient_attn.train.loop as train_module  # where train() looks compile_steps up
from efficient_attn import tasks
from efficient_attn.core import CapabilityError
from efficient_attn.nn import CausalLM, LMConfig
from efficient_attn.tasks.base import IGNORE, Split, TaskData
from efficient_attn.tasks.packing import example_lengths, pack, pack_task
from efficient_attn.train import TrainConfig, make_batch, train


def _ragged_split(n: int, width: int, seed: int) -> Split:
    """Right-padded examples of random lengths, next-token targets scored on about half."""
    r = np.random.default_rng(seed)
    lengths = r.integers(3, width + 1, n)
    mask = np.arange(width)[None] < lengths[:, None]
    x = np.where(mask, r.integers(1, 16, (n, width)), 0).astype(np.int32)
    y = np.where(mask & (r.random((n, width)) < 0.5), r.integers(0, 16, (n, width)), IGNORE).astype(np.int32)
    return Split(x, y, mask)


def _segments(split: Split):
    """(row, id, start, stop) of every real segment of a packed split, in order."""
    out = []
    seg, mask = np.asarray(split.segment_ids), np.asarray(split.mask)
    for r in range(seg.shape[0]):
        for s in np.unique(seg[r][mask[r]]):
            where = np.flatnonzero((seg[r] == s) & mask[r])
            out.append((r, int(s), int(where[0]), int(where[-1]) + 1))
    return out


def test_pack_keeps_every_token_and_target_in_sorted_segments():
    src = _ragged_split(9, 12, seed=0)
    packed = pack(src, 20)
    seg, mask = np.asarray(packed.segment_ids), np.asarray(packed.mask)
    assert (np.diff(seg, axis=1) >= 0).all() and (seg[:, 0] == 0).all()
    TaskData("p", "token", True, 16, 16, 20, packed, packed, packed)  # the contract's checks accept it
    lengths = example_lengths(src)
    pieces = _segments(packed)
    assert [b - a for _, _, a, b in pieces] == lengths.tolist()  # every example once, in order, uncut
    assert len(packed) < len(src)  # and several share a row
    for i, (r, s, a, b) in enumerate(pieces):
        assert (seg[r, a:b] == s).all()
        np.testing.assert_array_equal(packed.inputs[r, a:b], src.inputs[i, :lengths[i]])
        # its own targets at its own positions: the same scored positions, none reading another example
        np.testing.assert_array_equal(packed.targets[r, a:b], src.targets[i, :lengths[i]])
    # padding: after the last example, an id of its own, nothing real, nothing scored
    for r in range(len(packed)):
        last = seg[r][mask[r]].max()
        assert (seg[r][~mask[r]] == last + 1).all() and (mask[r][: mask[r].sum()]).all()
    assert (packed.targets[~mask] == IGNORE).all() and (packed.inputs[~mask] == 0).all()
    with pytest.raises(ValueError, match=f"at least {lengths.max()}"):
        pack(src, 8)
    with pytest.raises(ValueError, match="already packed"):
        pack(packed, 20)


def test_pack_task_mqar_per_sequence_scoring_and_groups():
    data = tasks.generate("mqar", seq_len=16, num_train=8, num_val=4, num_test=4, vocab_size=32, num_pairs=2)
    packed = pack_task(data, 64)
    assert packed.seq_len == 64 and len(packed.train) == 2  # four sequences a row, no padding
    for r, s, a, b in _segments(packed.train):
        assert (packed.train.targets[r, a:b] != IGNORE).sum() == 2  # each sequence's own 2 queries
    with pytest.raises(ValueError, match="pack_eval=False"):
        tasks.eval_groups(packed, packed.test)
    one_a_row = pack_task(data, 64, pack_eval=False)
    assert len(one_a_row.test) == 4
    assert tasks.eval_groups(one_a_row, one_a_row.test)[1].tolist() == [2] * 4
    listops = TaskData("listops", "classify", False, 16, 10, 8,
                       *(Split(np.zeros((2, 8), np.int32), np.zeros(2, np.int32), np.ones((2, 8), bool)),) * 3)
    with pytest.raises(ValueError, match="pack=False"):
        pack_task(listops, 16)


def _lm(attention: str, position: str, short_conv: int, seed: int = 0, vocab: int = 16) -> CausalLM:
    cfg = LMConfig(vocab_size=vocab, max_len=32, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32,
                   attention=attention, position=position, short_conv=short_conv, fast_exact=False)
    return CausalLM(cfg, rngs=nnx.Rngs(seed))


@nnx.jit
def _logits(model, tokens, mask, segment_ids=None):
    return model(tokens, mask, segment_ids=segment_ids)


@pytest.mark.parametrize("attention,position,short_conv", [("full", "learned", 3), ("linear", "rotary", 3),
                                                           ("full", "sinusoidal", 0)])
def test_packed_forward_equals_each_sequence_alone(attention, position, short_conv):
    """Each sequence of a packed row gets the logits it gets unpacked: alone at the start of a
    right-padded row, which under the causal mask is the sequence alone."""
    model = _lm(attention, position, short_conv)
    src = _ragged_split(5, 13, seed=1)
    packed = pack(src, 26)
    assert sum(a > 0 for _, _, a, _ in _segments(packed)) >= 2  # sequences that start mid-row
    logits = _logits(model, packed.inputs, packed.mask, packed.segment_ids)
    alone = _logits(model, src.inputs, src.mask)
    lengths = example_lengths(src)
    for i, (r, _, a, b) in enumerate(_segments(packed)):
        np.testing.assert_allclose(logits[r, a:b], alone[i, :lengths[i]], atol=2e-5, rtol=2e-5,
                                   err_msg=f"{attention}/{position}: example {i} (row {r}, [{a}, {b}))")


def _packed_bytes():
    data = tasks.generate("bytes_lm", seq_len=15, num_train=6, num_val=2, num_test=2, seed=0)
    return data, pack_task(data, 32)  # two windows a row, 2 padding positions


def test_packed_train_step_loss_is_the_mean_over_the_examples_alone():
    data, packed = _packed_bytes()
    assert len(packed.train) == 3
    cfg = TrainConfig(steps=1, eval_every=1, batch_size=3, warmup=0, schedule="constant")
    res = train(_lm("full", "learned", 3, vocab=256), packed, cfg, progress=False)
    model = _lm("full", "learned", 3, vocab=256)  # the same initial parameters
    # every example is in the one batch, each run alone (unpacked: one window a row, no padding)
    ce = optax.softmax_cross_entropy_with_integer_labels(_logits(model, data.train.inputs, data.train.mask),
                                                         data.train.targets)
    assert math.isclose(res.history[0]["train_loss"], float(ce.mean()), rel_tol=1e-5)
    batch = make_batch(packed.train, np.arange(3), rows=3)
    np.testing.assert_array_equal(batch.segment_ids, packed.train.segment_ids)


class _NoSegmentsLM(CausalLM):
    accepts = frozenset({"dropout_key", "positions"})


def test_packed_training_refused_before_compiling(monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before refusing")

    monkeypatch.setattr(train_module, "compile_steps", no_compile)
    _, packed = _packed_bytes()
    cfg = TrainConfig(steps=1, eval_every=1, batch_size=3, warmup=0, schedule="constant")
    with pytest.raises(CapabilityError, match=r"retnet.*pack=False"):
        train(_lm("retnet", "learned", 0, vocab=256), packed, cfg, progress=False)
    no_segments = _NoSegmentsLM(_lm("full", "learned", 0, vocab=256).cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not accept segment_ids.*pack=False"):
        train(no_segments, packed, cfg, progress=False)
