"""The accuracy experiment's configuration: the model around the core, one task's setting, a sweep.

A row's ``fingerprint`` hashes everything that decides its result except the seed (task
setting, variant hyperparameters, data seed), so a rerun skips exactly the rows whose
setting has not changed; fields added after rows were stored stay out of the hash while at
their old default (``ModelSize.ADDED_LATER``, ``TrainConfig.ADDED_LATER``: the training
mesh), so those rows still match, and a run on a mesh is a row of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

from efficient_attn import report
from efficient_attn.core import check_config, check_positive_int
from efficient_attn.registry import list_variants
from efficient_attn.train import TrainConfig

__all__ = ["ModelSize", "TaskSetting", "AccuracyConfig", "TASK_TITLES", "current_rows", "data_fingerprint",
           "stored_scope", "widen_scope", "union_seeds", "union_variants"]

TASK_TITLES = {"listops": "ListOps", "pathfinder": "Pathfinder", "mqar": "MQAR", "bytes_lm": "bytes_lm",
               "selective_copy": "Selective copy"}


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """The model around the attention core (defaults: the 2-layer, width-64, 2-head, MLP-128
    configuration of the Nystromformer paper's LRA re-run, the smallest published one)."""

    num_layers: int = 2
    emb_dim: int = 64
    num_heads: int = 2
    mlp_dim: int = 128
    pool: str = "cls"  # classification only: "cls" or "mean"
    dropout: float = 0.0
    position: str = "learned"  # "learned", "sinusoidal" or "rotary" (efficient_attn.nn)
    short_conv: int = 0  # kernel of the causal depthwise convolution on the embeddings (nn); 0 = none

    # fields added after rows were stored: left out of a fingerprint while at these values, so
    # that those rows still match (TaskSetting.fingerprint)
    ADDED_LATER = (("position", "learned"), ("short_conv", 0))

    def __post_init__(self):
        for f in ("num_layers", "emb_dim", "num_heads", "mlp_dim"):
            check_positive_int("ModelSize", f, getattr(self, f))
        check_config("ModelSize", self.pool in ("cls", "mean"), f"pool must be 'cls' or 'mean', got {self.pool!r}")
        check_positive_int("ModelSize", "short_conv", self.short_conv, minimum=0)


@dataclasses.dataclass(frozen=True)
class TaskSetting:
    """One task of a preset: data sizes, generator ``params`` ((name, value) pairs), model, training."""

    task: str
    seq_len: int
    num_train: int
    num_val: int
    num_test: int
    model: ModelSize = ModelSize()
    train: TrainConfig = TrainConfig()
    params: tuple = ()

    def __post_init__(self):
        for f in ("seq_len", "num_train", "num_val", "num_test"):
            check_positive_int("TaskSetting", f, getattr(self, f))
        if isinstance(self.params, dict):
            object.__setattr__(self, "params", tuple(sorted(self.params.items())))

    def fingerprint(self, variant_kwargs: tuple, data_seed: int) -> str:
        """A short hash of everything that determines a run's result (except the seed)."""
        spec = dataclasses.asdict(self)
        for part, cls in (("model", ModelSize), ("train", TrainConfig)):
            for field, value in cls.ADDED_LATER:
                if spec[part][field] == value:
                    del spec[part][field]
        blob = json.dumps([spec, variant_kwargs, data_seed], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def data_fingerprint(setting: TaskSetting, data_seed: int) -> str:
    """A short hash of what decides a task's data (not the model or training)."""
    blob = json.dumps([setting.task, setting.seq_len, setting.num_train, setting.num_val, setting.num_test,
                       setting.params, data_seed], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class AccuracyConfig:
    """A sweep: tasks (each with its model and training), seeds, variants (None = all registered).

    ``variant_kwargs``: ((variant, ((name, value), ...)), ...) hyperparameters per variant;
    variants not named use their registered defaults (LRA's, see each variant's docstring).
    ``checkpoint_interval_s``: a run saves its orbax checkpoint at an evaluation when this long
    has passed since its last save; a run shorter than that never saves (its row is the record).
    ``task_notes``: ((task, text), ...) printed under that task's sanity line (e.g. why a preset
    chose its setting); not part of any fingerprint.
    ``sanity``: ((task, least accuracy), ...) the reference variant's expected test accuracy
    (MQAR: on its hardest reported pair count), stated before any run; tasks not named keep
    the defaults of ``report.SANITY_DEFAULTS``. Not part of any fingerprint.
    """

    preset: str
    tasks: tuple[TaskSetting, ...]
    seeds: tuple[int, ...] = (0,)
    variants: tuple[str, ...] | None = None
    variant_kwargs: tuple = ()
    data_seed: int = 0
    checkpoint_interval_s: float = 60.0  # orbax saves at evaluations at most this often
    task_notes: tuple = ()
    sanity: tuple = ()

    def __post_init__(self):
        check_config("AccuracyConfig", len(self.tasks) > 0, "tasks must not be empty")
        check_config("AccuracyConfig", len(self.seeds) > 0 and all(isinstance(s, int) and s >= 0 for s in self.seeds),
                     f"seeds must be non-negative ints, got {self.seeds!r}")
        check_config("AccuracyConfig", self.variants is None or len(self.variants) > 0,
                     "variants must be None (every registered variant) or name at least one")
        names = [t.task for t in self.tasks]
        check_config("AccuracyConfig", len(set(names)) == len(names), f"a task appears twice: {names}")

    def kwargs_for(self, variant: str) -> tuple:
        return dict(self.variant_kwargs).get(variant, ())

    def variant_names(self) -> list[str]:
        """The variants this sweep runs: those named, else every registered one (plugins included)."""
        return list(self.variants) if self.variants is not None else list_variants()


def current_rows(rows: Sequence[dict], cfg: AccuracyConfig) -> dict[tuple[str, str], list[dict]]:
    """Stored rows by (variant, task), keeping only those ``cfg`` would produce: a task of the
    config, a seed of the config, and the fingerprint of the config's setting."""
    settings = {t.task: t for t in cfg.tasks}
    by: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        s = settings.get(r.get("task"))
        if s is None or r.get("fingerprint") != s.fingerprint(cfg.kwargs_for(r["variant"]), cfg.data_seed):
            continue
        if r.get("seed") not in cfg.seeds:
            continue
        by.setdefault((r["variant"], r["task"]), []).append(r)
    return by


def stored_scope(out: str | Path) -> dict | None:
    """The scope (task names, seeds, variants) of the table last written in ``out``, or None."""
    try:
        stored = report.read_stored_json(out)["config"]
        return {"tasks": [t["task"] for t in stored.get("tasks", ())], "seeds": list(stored["seeds"]),
                "variants": stored["variants"]}
    except (KeyError, TypeError, AttributeError):
        return None


def widen_scope(cfg: AccuracyConfig, stored: dict | None, tasks: Sequence[TaskSetting]) -> AccuracyConfig:
    """The config a folder's table describes after ``cfg`` ran there: ``cfg`` together with the
    table's earlier scope ``stored`` (``stored_scope``), so that re-running one variant, task or
    seed keeps every other cell in the table. ``tasks``: the settings to take a stored task's
    from (the preset's, with this invocation's settings); stored names it lacks are dropped.
    ``variants`` None (every registered variant) on either side stays None."""
    if stored is None:
        return cfg
    names = {t.task for t in cfg.tasks} | set(stored["tasks"])
    mine = {t.task: t for t in cfg.tasks}
    widened = tuple(mine.get(t.task, t) for t in tasks if t.task in names)
    widened += tuple(t for t in cfg.tasks if t.task not in {w.task for w in widened})
    return dataclasses.replace(cfg, tasks=widened, seeds=union_seeds(cfg.seeds, stored["seeds"]),
                               variants=union_variants(cfg.variants, stored["variants"]))


def union_seeds(mine: Sequence[int], stored: Sequence) -> tuple[int, ...]:
    """This run's seeds and a stored table's, sorted."""
    return tuple(sorted(set(mine) | {s for s in stored if isinstance(s, int) and s >= 0}))


def union_variants(mine: Sequence[str] | None, stored: Sequence[str] | None) -> tuple[str, ...] | None:
    """A stored table's variants, then this run's; None (every registered one) on either side
    stays None. A stored plugin variant not loaded now drops out (it can be neither planned nor
    rendered)."""
    if mine is None or stored is None:
        return None
    known = set(list_variants())
    return tuple(dict.fromkeys([*(v for v in stored if v in known), *mine]))
