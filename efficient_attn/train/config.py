"""``TrainConfig``, the optimisation settings; the learning-rate schedules and the optimiser.

- Optimizer: AdamW (b1 0.9, b2 0.98, eps 1e-9 as in LRA) after global-norm gradient
  clipping; weight decay on matrices only (not biases, LayerNorm scales or the CLS vector).
- Learning rate: linear warm-up to ``lr`` over ``warmup`` steps, then ``schedule``:
  ``cosine`` (to 0 at ``steps``), ``linear`` (to 0), ``constant``, or ``rsqrt``, which is
  LRA's ``constant * linear_warmup * rsqrt_decay``: lr * min(1, s / w) / sqrt(max(s, w))
  (so LRA's base rate 0.05 peaks at 0.05 / sqrt(1000) ~ 1.6e-3).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import optax

from efficient_attn.core import check_config, check_positive_int
from efficient_attn.parallel.mesh import format_mesh, parse_mesh
from efficient_attn.train.mesh import mesh_axes


SCHEDULES = ("cosine", "linear", "constant", "rsqrt")


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
    mesh: str | None = None  # e.g. "data=2,seq=4" (train/mesh.py); None = every device on "data"

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
