"""The compiled pieces: ``forward``, ``loss_sums``, ``train_step``, ``eval_step`` (pure functions
of arrays) and ``evaluate`` (a split, batch by batch, to a metric).

The train and eval steps are compiled once each, ahead of time
(``jit(...).lower(...).compile()``: ``compile_steps``), and the compile time reported apart.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient_attn.tasks.base import IGNORE, Split
from efficient_attn.train.batches import Batch
from efficient_attn.train.inputs import model_accepts


def loss_sums(logits, targets, weights, kind: str):
    """Sums of cross-entropy, correct predictions and counted targets (weights zero padding rows)."""
    logits = logits.astype(jnp.float32)
    if kind == "classify":
        w = weights
        tgt = targets
    else:
        w = (targets != IGNORE).astype(jnp.float32) * weights[:, None]
        tgt = jnp.where(targets == IGNORE, 0, targets)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
    correct = (jnp.argmax(logits, axis=-1) == tgt).astype(jnp.float32)
    return jnp.sum(ce * w), jnp.sum(correct * w), jnp.sum(w)


def forward(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, batch: Batch, *, use_mask: bool,
            dropout_key: jax.Array | None = None):
    """Logits of the model ``(graphdef, params, rest)`` on ``batch``, and the model's non-Param
    state after the call (e.g. an advanced RNG stream). ``use_mask=False`` gives the model no
    padding mask; ``dropout_key``, ``batch.positions`` and ``batch.segment_ids`` are passed only
    when given (``segment_ids`` only to a model that accepts them: ``train`` refuses the others)."""
    # fresh Variables created in this trace, so that a call may update them (RNG streams)
    model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
    extra = {}
    if dropout_key is not None:
        extra["dropout_key"] = dropout_key
    if batch.positions is not None:
        extra["positions"] = batch.positions
    if batch.segment_ids is not None and "segment_ids" in model_accepts(model):
        extra["segment_ids"] = batch.segment_ids
    logits = model(batch.tokens, batch.mask if use_mask else None, **extra)
    return logits, nnx.split(model, nnx.Param, ...)[2]


def train_step(params, rest, opt_state, step, batch: Batch, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, kind: str, use_mask: bool, dropout_seed: int | None):
    """One optimiser step on the mean loss of ``batch``: new (params, rest, opt_state) and the loss.

    ``dropout_seed`` None = no dropout; else the dropout key is ``fold_in(key(seed), step)``."""
    key = jax.random.fold_in(jax.random.key(dropout_seed), step) if dropout_seed is not None else None

    def loss_fn(p):
        logits, new_rest = forward(graphdef, p, rest, batch, use_mask=use_mask, dropout_key=key)
        loss_sum, _, count = loss_sums(logits, batch.targets, batch.weights, kind)
        return loss_sum / jnp.maximum(count, 1.0), new_rest

    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss


def eval_step(params, rest, batch: Batch, *, graphdef: nnx.GraphDef, kind: str, use_mask: bool):
    """``loss_sums`` of ``batch`` without dropout: (cross-entropy sum, correct, count)."""
    logits, _ = forward(graphdef, params, rest, batch, use_mask=use_mask)
    return loss_sums(logits, batch.targets, batch.weights, kind)


def metric_value(metric: str, loss_sum: float, correct: float, count: float) -> tuple[float, float, float]:
    """(metric, mean loss, accuracy) from sums; ``bits_per_byte`` is the mean loss / ln 2."""
    count = max(float(count), 1.0)
    loss = float(loss_sum) / count
    acc = float(correct) / count
    value = loss / math.log(2.0) if metric == "bits_per_byte" else acc
    return value, loss, acc


def evaluate(eval_fn: Callable, params, rest, split: Split, *, batch_size: int, metric: str,
             batches: Callable[[Split, np.ndarray, int], Batch]) -> tuple[float, float, float]:
    """(metric, mean loss, accuracy) of ``split``: ``eval_fn(params, rest, batch)`` summed over
    consecutive batches of ``batch_size`` rows (the last padded with zero-weight rows).
    ``batches(split, idx, rows)`` makes a batch on the devices (``make_batch`` + sharding)."""
    n = len(split)
    sums = np.zeros(3)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        out = eval_fn(params, rest, batches(split, idx, batch_size))
        sums += np.array([float(x) for x in out])
    return metric_value(metric, *sums)


def compile_steps(step_fn: Callable, eval_fn: Callable, step_args: tuple, eval_args: tuple, replicated):
    """``step_fn`` and ``eval_fn`` compiled ahead of time for these example arguments (outputs
    replicated), side by side: XLA compiles outside the GIL (about 25% less wall time).
    Returns (compiled step, compiled eval, compile seconds)."""
    t0 = time.perf_counter()
    lowered_step = jax.jit(step_fn, out_shardings=(replicated,) * 4).lower(*step_args)
    lowered_eval = jax.jit(eval_fn, out_shardings=replicated).lower(*eval_args)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        step_f, eval_f = pool.submit(lowered_step.compile), pool.submit(lowered_eval.compile)
        step_c, eval_c = step_f.result(), eval_f.result()
    return step_c, eval_c, time.perf_counter() - t0
