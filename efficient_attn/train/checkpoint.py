"""``TrainState``, everything a run carries from one step to the next, and its orbax checkpoints.

A checkpoint holds the state's arrays (PRNG keys as their key data) and a JSON record (the
config as ``TrainConfig.record()`` stores it, best-validation bookkeeping, history, wall time);
``restore_checkpoint`` refuses one written under another ``TrainConfig``. orbax is imported
where it is used, so that importing ``efficient_attn.train`` does not load it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from efficient_attn.train.config import TrainConfig


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
