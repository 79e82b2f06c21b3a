"""``train``: the loop that puts the pieces together, and ``TrainResult``, what a run produced.

- Data order is a pure function of (seed, step): example ``g = step * batch + i`` is
  position ``g mod n`` of the permutation drawn for epoch ``g // n`` from ``seed``. Dropout
  keys are ``fold_in(key(seed), step)``. The model's non-Param state (e.g. the RNG stream
  from which Performer redraws its features on every call) is threaded through the step
  and checkpointed. Hence a run killed and resumed from its last checkpoint ends with the
  same parameters and metrics as an uninterrupted one.
- Validation every ``eval_every`` steps and at the end; each validation appends a JSON line
  to ``metrics_path`` and saves an orbax checkpoint (params, optimizer state, best params,
  history) under ``workdir``. The reported test score is that of the best-validation params.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_attn.report import write_atomic
from efficient_attn.tasks.base import Split, TaskData
from efficient_attn.train.batches import Batch, batch_indices, make_batch
from efficient_attn.train.checkpoint import TrainState, checkpoint_manager, resume, save_checkpoint
from efficient_attn.train.config import TrainConfig, learning_rate, make_optimizer
from efficient_attn.train.inputs import _check_data, _check_packing, model_accepts, scored_positions
from efficient_attn.train.mesh import _on_mesh, _Sharder
from efficient_attn.train.steps import compile_steps, eval_step, evaluate, train_step


@dataclasses.dataclass
class TrainResult:
    """What a run produced. ``test`` is ``metric`` on the test split with the best-val params."""

    metric: str  # "accuracy" or "bits_per_byte"
    test: float
    test_loss: float
    test_accuracy: float
    best_val: float
    best_step: int
    steps: int
    resumed_from: int  # 0 = fresh start
    history: list[dict]
    wall_s: float  # training + evaluation time, summed over resumed calls
    compile_s: float
    tokens_per_s: float  # training tokens (batch * length) per second, compile excluded
    num_params: int
    model: Any = dataclasses.field(repr=False, default=None)  # the model with the best params
    params: Any = dataclasses.field(repr=False, default=None)  # the final params (nnx.State)

    def summary(self) -> dict:
        """Everything but the model and params: plain JSON-able values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "params")}


def _better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric == "bits_per_byte" else new > old


def train(
    model: nnx.Module,
    data: TaskData,
    cfg: TrainConfig,
    *,
    workdir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    use_mask: bool = True,
    progress: bool | None = None,
    desc: str | None = None,
    stop_after: int | None = None,
    checkpoint_interval_s: float = 0.0,
) -> TrainResult:
    """Train ``model`` (a ``Classifier`` or ``CausalLM``) on ``data`` and test its best-val params.

    ``workdir``: orbax checkpoint directory; when it holds a checkpoint of the same config,
    training resumes from it. ``use_mask=False`` gives the model no padding mask (only
    allowed when ``needs_kv_mask(data)`` is False, i.e. no padding can be seen).
    ``progress``: tqdm bar (default: only when stderr is a terminal). ``stop_after``: end
    after that many steps without a final evaluation, as a killed run would (for tests).
    ``checkpoint_interval_s``: save at an evaluation only when this long has passed since the
    last save (0 = at every evaluation); short runs then skip the cost of saving.
    ``cfg.mesh``: train on that device mesh (train/mesh.py), e.g. ``"data=2,seq=4"``.
    """
    _check_data(model, data, cfg, use_mask)
    metric, kind = data.metric, data.kind
    accepts = model_accepts(model)
    dropout = float(getattr(getattr(model, "cfg", None), "dropout", 0.0) or 0.0)
    if dropout > 0 and "dropout_key" not in accepts:
        raise ValueError(f"{type(model).__name__} has dropout={dropout} but does not accept a dropout_key "
                         "(its class attribute `accepts`); add it there or set dropout=0")
    scored = scored_positions(data) if "positions" in accepts else None
    _check_packing(model, data)
    mesh = None
    if cfg.mesh is not None:
        model, mesh = _on_mesh(model, data, cfg)  # before nnx.split: the graphdef holds the parallel cores
        _check_packing(model, data)  # the sequence-parallel cores replace the checked ones
    sharder = _Sharder(cfg.batch_size, mesh)

    def batches(split: Split, idx: np.ndarray, rows: int) -> Batch:
        return sharder.put_batch(make_batch(split, idx, rows=rows, scored=scored))

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = sharder.replicate(params), sharder.replicate(rest)
    tx = make_optimizer(cfg)
    opt_state = sharder.replicate(tx.init(params))
    step_fn = functools.partial(train_step, graphdef=graphdef, tx=tx, kind=kind, use_mask=use_mask,
                                dropout_seed=cfg.seed if dropout > 0 else None)
    eval_fn = functools.partial(eval_step, graphdef=graphdef, kind=kind, use_mask=use_mask)
    ex_train = batches(data.train, np.arange(min(cfg.batch_size, len(data.train))), cfg.batch_size)
    ex_eval = batches(data.val, np.arange(min(cfg.eval_batch, len(data.val))), cfg.eval_batch)
    step_c, eval_c, compile_s = compile_steps(step_fn, eval_fn, (params, rest, opt_state, jnp.int32(0), ex_train),
                                              (params, rest, ex_eval), sharder.replicated)
    score = functools.partial(evaluate, eval_c, batch_size=cfg.eval_batch, metric=metric, batches=batches)

    state = resume(workdir, TrainState(0, params, rest, opt_state, params, rest), cfg)
    start, prior_wall = state.step, state.wall_s

    def write_metrics():
        if metrics_path is not None:
            write_atomic(metrics_path, "".join(json.dumps(h) + "\n" for h in state.history))

    show = sys.stderr.isatty() if progress is None else progress
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not show, desc=desc or data.name, leave=False,
               dynamic_ncols=True)
    L = int(np.asarray(data.train.inputs).shape[1])
    train_time = 0.0
    trained_tokens = 0
    window: list[float] = []
    manager = None  # opened at the first save: a run that never saves creates no directory
    t_call = last_save = time.perf_counter()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    try:
        for step in range(start, end):
            batch = batches(data.train, batch_indices(len(data.train), cfg.batch_size, step, cfg.seed), cfg.batch_size)
            ts = time.perf_counter()
            state.params, state.rest, state.opt_state, loss = step_c(
                state.params, state.rest, state.opt_state, jnp.int32(step), batch)
            loss = float(loss)
            train_time += time.perf_counter() - ts
            trained_tokens += cfg.batch_size * L
            window.append(loss)
            done = state.step = step + 1
            bar.update(1)
            if done % 10 == 0 or done == end:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{trained_tokens / max(train_time, 1e-9):.0f}")
            if done % cfg.eval_every == 0 or done == cfg.steps:
                val, val_loss, val_acc = score(state.params, state.rest, data.val)
                if _better(metric, val, state.best_val):
                    state.best_params, state.best_rest, state.best_val, state.best_step = (
                        state.params, state.rest, val, done)
                state.history.append({
                    "step": done,
                    "train_loss": float(np.mean(window)),
                    f"val_{metric}": val,
                    "val_loss": val_loss,
                    "val_accuracy": val_acc,
                    "lr": float(learning_rate(cfg)(done)),
                })
                window = []
                write_metrics()
                now = time.perf_counter()
                if workdir is not None and now - last_save >= checkpoint_interval_s:
                    last_save = now
                    manager = manager or checkpoint_manager(workdir)
                    state.wall_s = prior_wall + now - t_call
                    save_checkpoint(manager, state, cfg)
    finally:
        bar.close()
        if manager is not None:
            manager.close()
    wall_s = prior_wall + time.perf_counter() - t_call
    test_value, test_loss, test_acc = score(state.best_params, state.best_rest, data.test)
    write_metrics()
    return TrainResult(
        metric=metric,
        test=test_value,
        test_loss=test_loss,
        test_accuracy=test_acc,
        best_val=state.best_val if state.best_val is not None else float("nan"),
        best_step=state.best_step,
        steps=end,
        resumed_from=start,
        history=state.history,
        wall_s=wall_s,
        compile_s=compile_s,
        tokens_per_s=trained_tokens / train_time if train_time > 0 else float("nan"),
        num_params=int(sum(x.size for x in jax.tree.leaves(state.params))),
        model=nnx.merge(graphdef, state.best_params, state.best_rest),
        params=state.params,
    )
