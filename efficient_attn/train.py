"""Training: optax AdamW, periodic validation, best-validation test score, orbax resume.

    train(model, data, TrainConfig(...), workdir=..., metrics_path=...) -> TrainResult

``train`` is built from top-level pieces, each usable alone (the layout of Flax's examples):
``train_step`` and ``eval_step`` (pure functions of arrays, compiled once each),
``evaluate`` (a split, batch by batch, to a metric), ``make_batch`` (rows of a split as a
``Batch``), and ``save_checkpoint`` / ``restore_checkpoint`` / ``resume`` over a
``TrainState``.

- Optimizer: AdamW (b1 0.9, b2 0.98, eps 1e-9 as in LRA) after global-norm gradient
  clipping; weight decay on matrices only (not biases, LayerNorm scales or the CLS vector).
- Learning rate: linear warm-up to ``lr`` over ``warmup`` steps, then ``schedule``:
  ``cosine`` (to 0 at ``steps``), ``linear`` (to 0), ``constant``, or ``rsqrt``, which is
  LRA's ``constant * linear_warmup * rsqrt_decay``: lr * min(1, s / w) / sqrt(max(s, w))
  (so LRA's base rate 0.05 peaks at 0.05 / sqrt(1000) ~ 1.6e-3).
- Data order is a pure function of (seed, step): example ``g = step * batch + i`` is
  position ``g mod n`` of the permutation drawn for epoch ``g // n`` from ``seed``. Dropout
  keys are ``fold_in(key(seed), step)``. The model's non-Param state (e.g. the RNG stream
  from which Performer redraws its features on every call) is threaded through the step
  and checkpointed. Hence a run killed and resumed from its last checkpoint ends with the
  same parameters and metrics as an uninterrupted one.
- Validation every ``eval_every`` steps and at the end; each validation appends a JSON line
  to ``metrics_path`` and saves an orbax checkpoint (params, optimizer state, best params,
  history) under ``workdir``. The reported test score is that of the best-validation params.
- Devices. Without ``TrainConfig.mesh`` the batch is sharded over every local device
  (``Mesh(jax.devices(), ("data",))``, batch axis on "data"), parameters replicated. With
  ``mesh="data=2,seq=4"`` (axes "data" and "seq" only, sizes multiplying to
  ``jax.device_count()``) the batch goes on ``P("data")`` of that mesh (its ``[B, L]`` arrays
  on ``P("data", "seq")``), parameters are
  replicated, and when "seq" has more than one device every attention core of (a copy of)
  the model is replaced by its sequence-parallel form along "seq" (``parallel.models.
  sequence_parallel``: ring attention for exact cores, context-parallel engines for the
  linear ones; a core without a form is refused). The batch size (train and eval) must be
  divisible by "data" and the attention's sequence length by "seq"; all of this is checked
  before a device is touched. Loss and gradients are those of the one-device run (to float32
  rounding; tests/parallel/test_training.py). On a CPU, simulate the devices before jax
  starts: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The returned ``model`` is
  then the sequence-parallel one (it runs on the mesh).
- The train and eval steps are compiled once each, ahead of time
  (``jit(...).lower(...).compile()``), and the compile time reported apart.

What a model must offer: ``model(tokens, mask)`` -> logits (``[B, C]`` for a classification
task, ``[B, L, V]`` for a token task), and a class attribute ``accepts``, the set of optional
keyword inputs it takes (``nn.Classifier`` and ``nn.CausalLM`` declare theirs):

    "dropout_key"   a PRNG key for dropout (passed only when the model's ``cfg.dropout`` > 0)
    "positions"     ``[B, K]`` int: logits only at those positions, ``[B, K, V]`` (a token task
                    scored at few positions then pays the vocabulary head there only)
    "segment_ids"   ``[B, L]`` int: the rows are packed (``tasks/packing.py``); the model keeps
                    every segment to itself (attention, positions, convolution)

A model that declares none of them is called with ``(tokens, mask)`` alone.

Packed data (splits with ``segment_ids``): the batches carry the ids, passed to a model that
accepts ``segment_ids``. A model that does not, or whose attention cores lack the ``segments``
capability, is refused before anything is compiled (it would let packed sequences see each
other): train such a model on the unpacked task (pack=False). The loss is the mean over scored
tokens, as unpacked: the token-weighted mean of the packed examples' losses.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.core import Attention, CapabilityError, check_config, check_positive_int
from efficient_attn.parallel.mesh import check_divisible, format_mesh, make_mesh, parse_mesh
from efficient_attn.parallel.models import sequence_parallel
from efficient_attn.report import write_atomic
from efficient_attn.tasks.base import IGNORE, Split, TaskData

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

SCHEDULES = ("cosine", "linear", "constant", "rsqrt")
MESH_AXES = ("data", "seq")  # the batch is split over "data", the attention's sequence over "seq"


def mesh_axes(spec: str) -> dict[str, int]:
    """``"data=2,seq=4"`` -> ``{"data": 2, "seq": 4}`` for training: ``parallel.parse_mesh``,
    and only the axes ``train`` knows (``MESH_AXES``); a ``ValueError`` naming the fix else."""
    if not isinstance(spec, str):
        raise ValueError(f"mesh must be a spec string such as 'data=2,seq=4' (or None), got {spec!r}")
    axes = parse_mesh(spec)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
        raise ValueError(
            f"axis {unknown[0]!r} of mesh {spec!r} is not one training uses; name only "
            f"{' and '.join(map(repr, MESH_AXES))} ('data': the batch is split over it; 'seq': the attention "
            "runs sequence-parallel along it), "
            "e.g. 'data=2,seq=4'"
        )
    return axes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Defaults: Adam(0.9, 0.98, 1e-9) as LRA, a cosine schedule."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    steps: int = 1000
    batch_size: int = 32
    eval_every: int = 100
    clip: float = 1.0
    seed: int = 0
    schedule: str = "cosine"
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-9
    eval_batch_size: int | None = None  # default: batch_size
    mesh: str | None = None  # e.g. "data=2,seq=4" (module docstring); None = every device on "data"

    # fields added after configs were stored (checkpoints, the experiments' row fingerprints):
    # left out of ``record()`` while at these values, so that what was stored before still matches
    ADDED_LATER = (("mesh", None),)

    def __post_init__(self):
        name = "TrainConfig"
        for field in ("steps", "batch_size", "eval_every"):
            check_positive_int(name, field, getattr(self, field))
        check_positive_int(name, "warmup", self.warmup, minimum=0)
        check_positive_int(name, "seed", self.seed, minimum=0)
        if self.eval_batch_size is not None:
            check_positive_int(name, "eval_batch_size", self.eval_batch_size)
        check_config(name, self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check_config(name, self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        check_config(name, self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        check_config(name, self.clip >= 0, f"clip must be >= 0 (0 = no clipping), got {self.clip!r}")
        check_config(name, 0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"b1, b2 must be in [0, 1), got {self.b1}, {self.b2}")
        check_config(name, self.schedule == "rsqrt" or self.warmup < self.steps,
                     f"warmup={self.warmup} must be < steps={self.steps} for a decaying schedule")
        if self.mesh is not None:
            try:
                axes = mesh_axes(self.mesh)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{name}: mesh: {err}") from None
            object.__setattr__(self, "mesh", format_mesh(axes))  # one spelling: one fingerprint
            data = axes.get("data", 1)
            for field, value in (("batch_size", self.batch_size), ("eval_batch_size", self.eval_batch)):
                check_config(name, value % data == 0,
                             f"{field}={value} must be divisible by the size of the mesh's 'data' axis ({data} in "
                             f"mesh={self.mesh!r}): the batch is split over it; use a multiple of {data} or "
                             "another 'data' size")

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size

    def mesh_sizes(self) -> dict[str, int] | None:
        """The mesh as ``{axis: size}``, or None without one."""
        return None if self.mesh is None else parse_mesh(self.mesh)

    def record(self) -> dict:
        """The config as stored (checkpoints, rows): plain JSON values, the ``ADDED_LATER``
        fields left out while at their old defaults."""
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        for field, value in self.ADDED_LATER:
            if out[field] == value:
                del out[field]
        return out


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


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """The step -> learning-rate function of ``cfg`` (warm-up, then ``cfg.schedule``)."""
    w = cfg.warmup
    if cfg.schedule == "rsqrt":
        def rsqrt(step):
            s = jnp.asarray(step, jnp.float32)
            warm = jnp.minimum(1.0, s / w) if w > 0 else 1.0
            return cfg.lr * warm / jnp.sqrt(jnp.maximum(s, jnp.maximum(w, 1)))
        return rsqrt
    decay_steps = cfg.steps - w
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
    else:
        after = optax.constant_schedule(cfg.lr)
    if w == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, w), after], [w])


def _decay_mask(params):
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Gradient clipping then AdamW with ``learning_rate(cfg)``; decay on matrices only."""
    adamw = optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=_decay_mask)
    if cfg.clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip), adamw)
    return adamw


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the training batch at ``step``: a pure function of ``(n, batch, step, seed)``."""
    g = step * batch_size + np.arange(batch_size)
    epochs, pos = g // n, g % n
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _permutation(n, seed, int(e))[pos[sel]]
    return out


def needs_kv_mask(data: TaskData) -> bool:
    """Whether a model on ``data`` needs the key padding mask to be right.

    False when no split has padding, or when the task is causal and every sequence is
    right-padded (a real query then never sees a later, padded key).
    """
    for split in (data.train, data.val, data.test):
        m = np.asarray(split.mask, bool)
        if m.all():
            continue
        if data.causal and (np.diff(m.astype(np.int8), axis=1) <= 0).all():
            continue  # right padding only: causal attention never reaches it
        return True
    return False


def scored_positions(data: TaskData) -> int | None:
    """For a token task scored at few positions per row (at most half of them, as MQAR's P of
    L): the most scored positions any row has, K. Training then computes the vocabulary head
    at K gathered positions per row instead of all L (same loss, same gradients: the other
    positions carry zero weight). None for classification and densely scored tasks."""
    if data.kind != "token":
        return None
    k = max(int((np.asarray(s.targets) != IGNORE).sum(axis=1).max(initial=0)) for s in (data.train, data.val, data.test))
    L = int(np.asarray(data.train.targets).shape[1])
    return max(k, 1) if k <= L // 2 else None


KNOWN_INPUTS = frozenset({"dropout_key", "positions", "segment_ids"})


def model_accepts(model: nnx.Module) -> frozenset[str]:
    """The optional keyword inputs ``model`` declares in its class attribute ``accepts``
    (module docstring); none declared = ``(tokens, mask)`` only."""
    accepts = getattr(type(model), "accepts", frozenset())
    if not isinstance(accepts, (frozenset, set)) or not all(isinstance(a, str) for a in accepts):
        raise TypeError(
            f"{type(model).__name__}.accepts must be a frozenset of input names such as {sorted(KNOWN_INPUTS)}, "
            f"got {accepts!r}"
        )
    return frozenset(accepts)


class Batch(NamedTuple):
    """One batch as the compiled steps take it (a pytree; ``positions`` None = every position)."""

    tokens: Int[Array, "B L"]
    mask: Bool[Array, "B L"]
    targets: Int[Array, " B"] | Int[Array, "B L"] | Int[Array, "B K"]  # classify | token | token at positions
    weights: Float[Array, " B"]  # 0 on the rows that only pad the batch to its fixed size
    positions: Int[Array, "B K"] | None = None
    segment_ids: Int[Array, "B L"] | None = None  # packed rows (the split's segment_ids); None = unpacked


def make_batch(split: Split, idx: np.ndarray, *, rows: int, scored: int | None = None) -> Batch:
    """The rows ``idx`` of ``split``, padded to ``rows`` with zero-weight rows. With ``scored``
    = K, the targets are cut to each row's first K scored positions (the rest IGNORE) and those
    positions come as ``positions`` ``[rows, K]``. A packed split's ``segment_ids`` come along."""
    pad = rows - len(idx)
    take = np.concatenate([idx, np.zeros(pad, idx.dtype)]) if pad else idx
    tokens = np.asarray(split.inputs)[take].astype(np.int32)
    mask = np.asarray(split.mask)[take].astype(bool)
    targets = np.asarray(split.targets)[take].astype(np.int32)
    segments = None if split.segment_ids is None else np.asarray(split.segment_ids)[take].astype(np.int32)
    weights = np.ones(rows, np.float32)
    if pad:
        weights[len(idx):] = 0.0
    if scored is None:
        return Batch(tokens, mask, targets, weights, segment_ids=segments)
    positions = np.argsort(targets == IGNORE, axis=1, kind="stable")[:, :scored].astype(np.int32)
    return Batch(tokens, mask, np.take_along_axis(targets, positions, axis=1), weights, positions, segments)


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


def _better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric == "bits_per_byte" else new > old


class _Sharder:
    """Puts batches on the 'data' axis of ``mesh`` (default: every local device on 'data'),
    params replicated. A mesh without a 'data' axis gets every batch whole on each device.

    With a 'seq' axis of more than one device, the arrays with a sequence axis (tokens, mask,
    per-token targets, segment ids: ``[B, L]``) are split along it too, so the embeddings,
    MLPs and head hold 1/P of each sequence per device, as the sequence-parallel attention
    does: per-device activation memory falls with P (the scaling experiment's ``lm`` rows
    measure it). A length the axis does not divide (a model adding a CLS position makes the
    attention's length, not L, the one checked) stays whole on each device."""

    def __init__(self, batch_size: int, mesh: Mesh | None = None):
        if mesh is None:
            devices = jax.devices()
            if batch_size % len(devices):
                raise ValueError(
                    f"batch_size={batch_size} must be divisible by the {len(devices)} local devices "
                    f"(the batch is sharded over them); use a multiple of {len(devices)}"
                )
            mesh = Mesh(np.array(devices), ("data",))
        self.mesh = mesh
        data = "data" if "data" in mesh.shape else None
        self.seq_size = int(mesh.shape.get("seq", 1))
        self.batch = NamedSharding(mesh, P(data))
        self.per_token = NamedSharding(mesh, P(data, "seq")) if self.seq_size > 1 else self.batch
        self.replicated = NamedSharding(mesh, P())

    def put_batch(self, batch: Batch) -> Batch:
        length = batch.tokens.shape[1]
        split = self.seq_size > 1 and length % self.seq_size == 0

        def put(x):
            if x is None:
                return None
            on_tokens = split and np.ndim(x) >= 2 and np.shape(x)[1] == length
            return jax.device_put(x, self.per_token if on_tokens else self.batch)

        return Batch(*(put(x) for x in batch))

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)


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


# ----------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass
class TrainState:
    """Everything a run carries from one step to the next; what a checkpoint holds.

    ``step`` steps are done; ``rest`` is the model's non-Param state (RNG streams);
    ``best_*`` are the best-validation params so far (``best_val`` None before the first
    validation); ``wall_s`` is the wall time of the calls that trained up to the checkpoint."""

    step: int
    params: Any
    rest: Any
    opt_state: Any
    best_params: Any
    best_rest: Any
    best_val: float | None = None
    best_step: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0

    def arrays(self) -> dict:
        """The array part, as orbax stores it."""
        return {"params": self.params, "rest": self.rest, "opt_state": self.opt_state,
                "best_params": self.best_params, "best_rest": self.best_rest}


def _config_json(cfg: TrainConfig) -> dict:
    return cfg.record()


def _is_key(x) -> bool:
    """A typed PRNG key array (RNG streams in a module's state): saved as its raw key data."""
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def latest_checkpoint(workdir: str | Path | None) -> int | None:
    """The step of the newest finished checkpoint in ``workdir``, or None (nothing created)."""
    if workdir is None or not Path(workdir).is_dir():
        return None
    if not any(p.name.isdigit() for p in Path(workdir).iterdir()):  # orbax's temporary dirs are not
        return None
    manager = checkpoint_manager(workdir)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def checkpoint_manager(workdir: str | Path):
    """An orbax ``CheckpointManager`` over ``workdir`` (created), newest checkpoint kept, synchronous."""
    import orbax.checkpoint as ocp

    directory = Path(workdir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True),
        item_names=("state", "record"),
    )


def save_checkpoint(manager, state: TrainState, cfg: TrainConfig) -> None:
    """Write ``state`` at ``state.step``: its arrays (PRNG keys as key data) and a JSON record
    (the config, best-validation bookkeeping, history, wall time); returns when on disk."""
    import orbax.checkpoint as ocp

    a = ocp.args
    arrays = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state.arrays())
    record = {"config": _config_json(cfg), "best_val": state.best_val, "best_step": state.best_step,
              "history": state.history, "wall_s": state.wall_s}
    manager.save(state.step, args=a.Composite(state=a.StandardSave(arrays), record=a.JsonSave(record)), force=True)
    manager.wait_until_finished()


def restore_checkpoint(manager, step: int, like: TrainState, cfg: TrainConfig) -> TrainState:
    """The ``TrainState`` saved at ``step``, with the shapes, dtypes and shardings of ``like``.

    A checkpoint written under another ``TrainConfig`` is refused (``ValueError``), never mixed in."""
    import orbax.checkpoint as ocp

    a = ocp.args
    like_arrays = like.arrays()
    plain = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, like_arrays)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), plain)
    out = manager.restore(step, args=a.Composite(state=a.StandardRestore(abstract), record=a.JsonRestore()))
    record = out["record"]
    if record.get("config") != _config_json(cfg):
        raise ValueError(
            f"checkpoint in {manager.directory} (step {step}) was written with a different TrainConfig "
            f"({record.get('config')}); delete that directory or train with the same config"
        )
    arrays = jax.tree.map(
        lambda d, x: jax.random.wrap_key_data(d, impl=jax.random.key_impl(x)) if _is_key(x) else d,
        out["state"], like_arrays,
    )
    return TrainState(step=step, **arrays, best_val=record["best_val"], best_step=record["best_step"],
                      history=list(record["history"]), wall_s=float(record["wall_s"]))


def resume(workdir: str | Path | None, fresh: TrainState, cfg: TrainConfig) -> TrainState:
    """The newest checkpoint in ``workdir`` when there is one, else ``fresh``."""
    step = latest_checkpoint(workdir)
    if step is None:
        return fresh
    manager = checkpoint_manager(workdir)
    try:
        return restore_checkpoint(manager, int(step), fresh, cfg)
    finally:
        manager.close()


# ----------------------------------------------------------------------------- the loop


def _check_data(model: nnx.Module, data: TaskData, cfg: TrainConfig, use_mask: bool) -> None:
    if data.kind not in ("classify", "token"):
        raise ValueError(f"task {data.name!r}: unknown kind {data.kind!r} (expected 'classify' or 'token')")
    if not use_mask and needs_kv_mask(data):
        raise ValueError(
            f"task {data.name!r} has padding that a model without the key mask would attend to; "
            "train with use_mask=True (and a variant whose capabilities include kv_mask)"
        )
    for split_name in ("train", "val", "test"):
        if len(getattr(data, split_name)) == 0:
            raise ValueError(f"task {data.name!r}: the {split_name} split is empty")
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab is not None and data.vocab_size > vocab:
        raise ValueError(
            f"task {data.name!r} has token ids up to vocab_size={data.vocab_size} but {type(model).__name__} "
            f"embeds only {vocab}; build the model with vocab_size={data.vocab_size}"
        )
    if cfg.mesh is None and cfg.eval_batch % len(jax.devices()):  # with a mesh: TrainConfig checked "data"
        raise ValueError(f"eval batch {cfg.eval_batch} must be divisible by {len(jax.devices())} devices")


def packed(data: TaskData) -> bool:
    """Whether any split of ``data`` holds packed rows (``segment_ids``)."""
    return any(getattr(data, s).segment_ids is not None for s in ("train", "val", "test"))


def _check_packing(model: nnx.Module, data: TaskData) -> None:
    """Packed data needs a model that accepts ``segment_ids`` and attention cores with the
    ``segments`` capability; refused here, before compiling, naming the fix."""
    if not packed(data):
        return
    if "segment_ids" not in model_accepts(model):
        raise ValueError(f"task {data.name!r} is packed (segment_ids) but {type(model).__name__} does not accept "
                         "segment_ids (its class attribute `accepts`), so packed sequences would see each other; "
                         "train on the unpacked task (pack=False) or use a model that accepts them (nn.CausalLM)")
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Attention) and not node.capabilities.segments:
            raise CapabilityError(node.variant_name, f"packed training on {data.name!r} (Mask segment ids; train on the "
                                        "unpacked task instead: pack=False)", "segments")


def _on_mesh(model: nnx.Module, data: TaskData, cfg: TrainConfig) -> tuple[nnx.Module, Mesh]:
    """The mesh of ``cfg.mesh`` and the model to train on it: a copy whose attention cores are
    sequence-parallel along "seq" when that axis has more than one device (the caller's model
    is left as it was). What is wrong with the request (a length "seq" does not divide, a core
    without a sequence-parallel form) is refused before the devices are counted."""
    axes = cfg.mesh_sizes()
    seq = axes.get("seq", 1)
    batch_axis = "data" if "data" in axes else None
    if seq > 1:
        abstract = AbstractMesh(tuple(axes.values()), tuple(axes))
        tokens = int(np.asarray(data.train.inputs).shape[1])
        m = getattr(model, "cfg", None)  # nn's configs: attention_len - max_len positions the model adds
        extra = int(m.attention_len - m.max_len) if hasattr(m, "attention_len") and hasattr(m, "max_len") else 0
        what = (f"the attention's sequence length ({tokens} tokens + {extra} position(s) the model adds, "
                "e.g. a CLS token: pool='mean' adds none)" if extra > 0 else "the sequence length")
        check_divisible(f"TrainConfig(mesh={cfg.mesh!r})", what, tokens + extra, abstract, "seq")
        sequence_parallel(nnx.clone(model), abstract, axis="seq", batch_axis=batch_axis)  # refuses, changes nothing
    mesh = make_mesh(axes)
    if seq > 1:
        model = sequence_parallel(nnx.clone(model), mesh, axis="seq", batch_axis=batch_axis)
    return model, mesh


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
    ``cfg.mesh``: train on that device mesh (module docstring), e.g. ``"data=2,seq=4"``.
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
