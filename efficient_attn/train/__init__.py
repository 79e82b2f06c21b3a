"""Training: optax AdamW, periodic validation, best-validation test score, orbax resume.

    train(model, data, TrainConfig(...), workdir=..., metrics_path=...) -> TrainResult

``train`` is built from top-level pieces, each usable alone (the layout of Flax's examples):
``train_step`` and ``eval_step`` (pure functions of arrays, compiled once each),
``evaluate`` (a split, batch by batch, to a metric), ``make_batch`` (rows of a split as a
``Batch``), and ``save_checkpoint`` / ``restore_checkpoint`` / ``resume`` over a
``TrainState``.

What lives where (each file's docstring says more):

    config.py      TrainConfig, the learning-rate schedules, the optimiser
    mesh.py        mesh_axes, and training on a device mesh (sharding, sequence-parallel cores)
    batches.py     Batch, make_batch, batch_indices (the data order)
    inputs.py      what a model takes and a task needs: model_accepts, needs_kv_mask,
                   scored_positions, packed
    steps.py       forward, loss_sums, train_step, eval_step, evaluate, compile_steps
    checkpoint.py  TrainState and its orbax checkpoints: save, restore, resume
    loop.py        train and TrainResult

The public names are re-exported here: ``from efficient_attn.train import train, TrainConfig`` is the
import to use.
"""

from efficient_attn.train.mesh import MESH_AXES, mesh_axes
from efficient_attn.train.config import SCHEDULES, TrainConfig, learning_rate, make_optimizer
from efficient_attn.train.batches import Batch, batch_indices, make_batch
from efficient_attn.train.inputs import KNOWN_INPUTS, model_accepts, needs_kv_mask, packed, scored_positions
from efficient_attn.train.steps import compile_steps, eval_step, evaluate, forward, loss_sums, metric_value, train_step
from efficient_attn.train.checkpoint import (
    TrainState,
    checkpoint_manager,
    latest_checkpoint,
    restore_checkpoint,
    resume,
    save_checkpoint,
)
from efficient_attn.train.loop import TrainResult, train

__all__ = [
    "TrainConfig",
    "MESH_AXES",
    "mesh_axes",
    "TrainResult",
    "TrainState",
    "Batch",
    "SCHEDULES",
    "learning_rate",
    "make_optimizer",
    "batch_indices",
    "needs_kv_mask",
    "packed",
    "scored_positions",
    "model_accepts",
    "make_batch",
    "forward",
    "loss_sums",
    "train_step",
    "eval_step",
    "evaluate",
    "compile_steps",
    "latest_checkpoint",
    "checkpoint_manager",
    "save_checkpoint",
    "restore_checkpoint",
    "resume",
    "train",
]
