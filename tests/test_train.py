"""Training loop: learning, schedules, deterministic data order, compile-once, kill-and-resume."""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn.variants.full import full_attention

from efficient_attn.nn import CausalLM, Classifier, EncoderConfig, LMConfig
from efficient_attn.tasks.base import IGNORE, Split, TaskData
from efficient_attn.train import (
    TrainConfig,
    TrainState,
    batch_indices,
    checkpoint_manager,
    eval_step,
    evaluate,
    learning_rate,
    make_batch,
    make_optimizer,
    needs_kv_mask,
    restore_checkpoint,
    save_checkpoint,
    train,
    train_step,
)

L = 16


def _cls_split(n, seed, pad=False):
    r = np.random.default_rng(seed)
    x = r.integers(1, 8, (n, L)).astype(np.int32)
    m = np.ones((n, L), bool)
    if pad:
        lengths = r.integers(4, L + 1, n)
        m = np.arange(L)[None] < lengths[:, None]
        x = np.where(m, x, 0).astype(np.int32)
    y = (x[:, 0] % 2).astype(np.int32)  # the label is the parity of the first token
    return Split(x, y, m)


def toy_classify(pad=False):
    return TaskData("toy", "classify", False, 8, 2, L, _cls_split(256, 0, pad), _cls_split(64, 1, pad),
                    _cls_split(64, 2, pad))


def toy_model(seed=0, attention="full"):
    cfg = EncoderConfig(vocab_size=8, max_len=L, num_classes=2, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32,
                        attention=attention)
    return Classifier(cfg, rngs=nnx.Rngs(seed))


@dataclasses.dataclass(frozen=True)
class _RedrawConfig:
    pass


@pytest.fixture(scope="module")
def redraw_variant():
    """A variant that draws fresh randomness on every call from an RNG stream in its state
    (as Performer's redrawn features do): the stream must advance across training steps."""

    @ea.register("_test_redraw", config=_RedrawConfig)
    class Redraw(ea.Attention):
        capabilities = ea.Capabilities(causal=True, cross=True, kv_mask=True)

        def __init__(self, config, dims, *, rngs):
            super().__init__(config, dims, rngs=rngs)
            self.rngs = nnx.Rngs(rngs.params())

        def attend(self, q, k, v, mask):
            scale = jax.random.uniform(self.rngs.default(), (), minval=0.5, maxval=1.5)
            return full_attention(q * scale, k, v, mask)

    yield "_test_redraw"
    ea.registry.unregister("_test_redraw")


FAST = dict(lr=3e-3, warmup=5, batch_size=16, eval_every=10)


def test_loss_decreases_and_beats_chance(tmp_path):
    res = train(toy_model(), toy_classify(pad=True), TrainConfig(steps=100, **FAST), workdir=tmp_path / "ck",
                metrics_path=tmp_path / "m.jsonl", progress=False, checkpoint_interval_s=1e9)
    assert not (tmp_path / "ck").exists()  # a run shorter than the checkpoint interval never saves
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0] - 0.05, losses
    assert res.best_val > 0.6 and res.metric == "accuracy"
    lines = [json.loads(s) for s in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines] == list(range(10, 101, 10))
    assert all(np.isfinite(d["val_accuracy"]) for d in lines)
    assert res.compile_s > 0 and res.tokens_per_s > 0 and res.steps == 100


def test_batch_order_is_a_function_of_seed_and_step():
    n, b = 10, 4
    a = [batch_indices(n, b, s, seed=3) for s in range(5)]
    again = [batch_indices(n, b, s, seed=3) for s in (4, 0, 2, 1, 3)]
    for s, x in zip((4, 0, 2, 1, 3), again):
        np.testing.assert_array_equal(x, a[s])
    flat = np.concatenate(a)  # 20 examples = 2 epochs, each a permutation of range(10)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert not np.array_equal(batch_indices(n, b, 0, seed=4), a[0]) or not np.array_equal(
        batch_indices(n, b, 1, seed=4), a[1])


def test_schedules():
    warm = TrainConfig(lr=1.0, warmup=10, steps=110, schedule="cosine")
    f = learning_rate(warm)
    assert float(f(0)) == 0.0 and math.isclose(float(f(5)), 0.5, rel_tol=1e-6)
    assert math.isclose(float(f(10)), 1.0, rel_tol=1e-6) and float(f(110)) < 1e-6
    assert math.isclose(float(f(60)), 0.5, rel_tol=1e-4)  # cosine midpoint
    lin = learning_rate(TrainConfig(lr=1.0, warmup=10, steps=110, schedule="linear"))
    assert math.isclose(float(lin(60)), 0.5, rel_tol=1e-5)
    rs = learning_rate(TrainConfig(lr=0.05, warmup=1000, steps=5000, schedule="rsqrt"))
    assert math.isclose(float(rs(500)), 0.05 * 0.5 / math.sqrt(1000), rel_tol=1e-5)  # LRA's formula
    assert math.isclose(float(rs(4000)), 0.05 / math.sqrt(4000), rel_tol=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(warmup=100, steps=50)


@pytest.mark.parametrize("attention", ["full", "redraw"])
def test_kill_and_resume_gives_identical_result(tmp_path, attention, redraw_variant):
    attention = redraw_variant if attention == "redraw" else attention
    cfg = TrainConfig(steps=40, **FAST)
    data = toy_classify(pad=True)
    straight = train(toy_model(attention=attention), data, cfg, workdir=tmp_path / "a", progress=False)
    # "killed" after 25 steps: the last checkpoint on disk is step 20 ...
    train(toy_model(attention=attention), data, cfg, workdir=tmp_path / "b", metrics_path=tmp_path / "b.jsonl",
          progress=False, stop_after=25)
    # ... and a fresh process (fresh model init with another seed: it must be overwritten) resumes
    resumed = train(toy_model(seed=7, attention=attention), data, cfg, workdir=tmp_path / "b",
                    metrics_path=tmp_path / "b.jsonl", progress=False)
    assert resumed.resumed_from == 20 and straight.resumed_from == 0
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(nnx.state(straight.model, nnx.Param)),
                    jax.tree.leaves(nnx.state(resumed.model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    strip = lambda hs: [{k: v for k, v in h.items()} for h in hs]  # noqa: E731
    assert strip(straight.history) == strip(resumed.history)
    assert (straight.test, straight.best_val, straight.best_step) == (resumed.test, resumed.best_val, resumed.best_step)
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [10, 20, 30, 40]
    # a checkpoint written under another config is refused, not silently mixed in
    with pytest.raises(ValueError, match="different TrainConfig"):
        train(toy_model(attention=attention), data, TrainConfig(steps=50, **FAST), workdir=tmp_path / "b",
              progress=False)


def test_module_rng_state_advances_across_steps(redraw_variant):
    model = toy_model(attention=redraw_variant)
    count0 = int(model.trunk.blocks[0].attn.core.rngs.default.count[...])
    res = train(model, toy_classify(), TrainConfig(steps=12, **FAST), progress=False)
    count = int(res.model.trunk.blocks[0].attn.core.rngs.default.count[...])
    # one draw per training step (the best checkpoint is step 10 or 12); evaluation draws do not advance it
    assert count - count0 == res.best_step, (count0, count, res.best_step)


def test_compiles_once_regardless_of_steps_and_evals():
    from jax import monitoring

    counts = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration" and counts:
            counts[-1] += 1

    monitoring.register_event_duration_secs_listener(listener)
    try:
        data = toy_classify()
        model = toy_model()
        for steps, every in ((10, 10), (10, 10), (40, 5)):  # the first warms up eager-op caches
            counts.append(0)
            train(model, data, TrainConfig(lr=1e-3, warmup=2, steps=steps, batch_size=16, eval_every=every),
                  progress=False)
    finally:
        monitoring.unregister_event_duration_listener(listener)
    # one train step and one eval step per call, whether 10 steps or 40 with 8x the evaluations
    assert counts[1] == counts[2] == 2, counts


def _lm_split(n, seed):
    """Copy task: the second half repeats the first; only the second half is scored."""
    r = np.random.default_rng(seed)
    half = r.integers(0, 6, (n, L // 2))
    x = np.concatenate([half, half], axis=1).astype(np.int32)
    y = np.full((n, L), IGNORE, np.int32)
    y[:, L // 2 - 1:-1] = x[:, L // 2:]
    lengths = r.integers(L - 2, L + 1, n)
    m = np.arange(L)[None] < lengths[:, None]  # right padding only
    y = np.where(np.concatenate([m[:, 1:], np.zeros((n, 1), bool)], axis=1), y, IGNORE).astype(np.int32)
    return Split(x, y, m)


def test_token_task_bits_per_byte_and_right_padding():
    data = TaskData("toy_lm", "token", True, 6, 6, L, _lm_split(128, 0), _lm_split(32, 1), _lm_split(32, 2),
                    metric="bits_per_byte")
    assert not needs_kv_mask(data)  # right padding under a causal mask is never seen
    model = CausalLM(LMConfig(vocab_size=6, max_len=L, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32),
                     rngs=nnx.Rngs(0))
    res = train(model, data, TrainConfig(steps=30, **FAST), use_mask=False, progress=False)
    assert res.metric == "bits_per_byte"
    assert math.isclose(res.test, res.test_loss / math.log(2), rel_tol=1e-9)
    first = res.history[0]["val_bits_per_byte"]
    assert 0 < res.best_val <= first < 8


def test_mask_refusal_when_padding_would_be_seen():
    data = toy_classify(pad=True)
    assert needs_kv_mask(data) and not needs_kv_mask(toy_classify())
    with pytest.raises(ValueError, match="padding"):
        train(toy_model(), data, TrainConfig(steps=10, **FAST), use_mask=False, progress=False)


class _DenseHeadLM(CausalLM):
    """The same model declaring no ``positions`` input: train must then use the dense head."""

    accepts = frozenset({"dropout_key"})


def test_sparse_scored_positions_path_equals_dense_head():
    """A token task scored at few positions per row trains the head only there
    (``scored_positions``), for a model that declares ``positions`` in ``accepts``; the loss
    trajectory and the test result equal those of the same model declaring no ``positions``
    (dense head), and ``CausalLM(positions=...)`` equals the full logits gathered there."""
    import efficient_attn.train as train_mod

    data = TaskData("toy_lm", "token", True, 6, 6, L, _lm_split(128, 0), _lm_split(32, 1), _lm_split(32, 2))
    assert train_mod.scored_positions(data) == L // 2
    cfg = LMConfig(vocab_size=6, max_len=L, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(data.val.inputs[:4])
    pos = jnp.asarray(np.tile(np.array([[1, 5, 15]], np.int32), (4, 1)))
    np.testing.assert_allclose(model(tokens, positions=pos), np.take_along_axis(
        np.asarray(model(tokens)), np.asarray(pos)[..., None], axis=1), rtol=1e-6, atol=1e-6)

    tc = TrainConfig(steps=20, **FAST)
    assert "positions" in train_mod.model_accepts(model)
    assert train_mod.model_accepts(_DenseHeadLM(cfg, rngs=nnx.Rngs(0))) == {"dropout_key"}
    sparse = train(CausalLM(cfg, rngs=nnx.Rngs(0)), data, tc, use_mask=False, progress=False)
    dense = train(_DenseHeadLM(cfg, rngs=nnx.Rngs(0)), data, tc, use_mask=False, progress=False)
    for a, b in zip(sparse.history, dense.history):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-4)
        assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=1e-4)
    assert math.isclose(sparse.test_loss, dense.test_loss, rel_tol=1e-4)
    dense_task = TaskData("d", "token", True, 6, 6, L, *(Split(s.inputs, np.where(s.targets == IGNORE, 0, s.targets),
                                                            s.mask) for s in (data.train, data.val, data.test)))
    assert train_mod.scored_positions(dense_task) is None  # every position scored: no gathering


class _MinimalModel(nnx.Module):
    """A model declaring no optional inputs: called as model(tokens, mask) only."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(8, 8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, tokens, mask):
        w = mask.astype(jnp.float32)[..., None]
        return self.out((self.emb(tokens) * w).sum(1) / jnp.maximum(w.sum(1), 1.0))


def test_model_without_declared_inputs_trains_and_dropout_needs_a_declared_key():
    res = train(_MinimalModel(nnx.Rngs(0)), toy_classify(pad=True), TrainConfig(steps=10, **FAST), progress=False)
    assert res.steps == 10 and np.isfinite(res.test_loss)

    class NoKey(Classifier):
        accepts = frozenset()

    cfg = EncoderConfig(vocab_size=8, max_len=L, num_classes=2, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32,
                        dropout=0.1)
    with pytest.raises(ValueError, match="dropout_key"):
        train(NoKey(cfg, rngs=nnx.Rngs(0)), toy_classify(), TrainConfig(steps=10, **FAST), progress=False)


def test_model_vocab_smaller_than_the_task_is_refused():
    small = Classifier(EncoderConfig(vocab_size=6, max_len=L, num_classes=2, num_layers=1, emb_dim=16, num_heads=2,
                                     mlp_dim=32), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"vocab_size=8 but Classifier embeds only 6"):
        train(small, toy_classify(), TrainConfig(steps=10, **FAST), progress=False)


def test_top_level_steps_are_what_train_runs():
    """``train_step`` / ``eval_step`` / ``make_batch`` / ``evaluate`` used by hand, in train's
    data order, give train's loss at every step and its final validation score exactly."""
    data, cfg = toy_classify(pad=True), TrainConfig(steps=4, lr=3e-3, warmup=1, batch_size=16, eval_every=1)
    res = train(toy_model(), data, cfg, progress=False)
    graphdef, params, rest = nnx.split(toy_model(), nnx.Param, ...)
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, kind="classify", use_mask=True,
                                     dropout_seed=None))
    losses = []
    for s in range(cfg.steps):
        batch = make_batch(data.train, batch_indices(len(data.train), cfg.batch_size, s, cfg.seed), rows=cfg.batch_size)
        params, rest, opt_state, loss = step(params, rest, opt_state, jnp.int32(s), batch)
        losses.append(float(loss))
    assert losses == [h["train_loss"] for h in res.history]
    score = jax.jit(functools.partial(eval_step, graphdef=graphdef, kind="classify", use_mask=True))
    val = evaluate(score, params, rest, data.val, batch_size=cfg.eval_batch, metric="accuracy",
                   batches=lambda split, idx, rows: make_batch(split, idx, rows=rows))
    assert val == (res.history[-1]["val_accuracy"], res.history[-1]["val_loss"], res.history[-1]["val_accuracy"])


def test_checkpoint_round_trip_and_config_guard(tmp_path, redraw_variant):
    """save_checkpoint / restore_checkpoint keep every array (PRNG keys included) and the
    record; a checkpoint of another TrainConfig is refused."""
    cfg = TrainConfig(steps=10, **FAST)
    model = toy_model(attention=redraw_variant)
    _, like_params, like_rest = nnx.split(model, nnx.Param, ...)
    model(jnp.ones((1, L), jnp.int32))  # advances the variant's RNG stream: rest now differs from like_rest
    _, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = make_optimizer(cfg).init(params)
    bumped = jax.tree.map(lambda x: x + 1, params)
    state = TrainState(7, params, rest, opt_state, bumped, rest, best_val=0.5, best_step=5,
                       history=[{"step": 5, "val_accuracy": 0.5}], wall_s=1.25)
    manager = checkpoint_manager(tmp_path / "ck")
    save_checkpoint(manager, state, cfg)
    zeros = jax.tree.map(jnp.zeros_like, like_params)
    like = TrainState(0, zeros, like_rest, make_optimizer(cfg).init(zeros), zeros, like_rest)
    back = restore_checkpoint(manager, 7, like, cfg)
    assert (back.step, back.best_val, back.best_step, back.history, back.wall_s) == (7, 0.5, 5, state.history, 1.25)
    for name in ("params", "rest", "opt_state", "best_params", "best_rest"):
        want, got = jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(back, name))
        assert len(want) == len(got), name
        for a, b in zip(want, got):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    with pytest.raises(ValueError, match="different TrainConfig"):
        restore_checkpoint(manager, 7, like, dataclasses.replace(cfg, lr=1e-4))
    manager.close()
