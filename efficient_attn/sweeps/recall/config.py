"""The recall sweep's configuration: one MQAR setting, the points each variant is trained at.

A point is (variant, axis, value): axis ``"width"`` trains the variant at its registered
defaults in a model of that width (``emb_dim``; MLP twice as wide, the heads of the task's
model, so the head width grows with it); axis ``"budget"`` trains it at ``budget_width`` with
its declared budget knob (``registry.Budget``) at that value (length-like values above the
task's length dropped). A point's fingerprint is the accuracy experiment's
(``TaskSetting.fingerprint``) of its model and hyperparameters.
"""

from __future__ import annotations

import dataclasses

from efficient_attn.core import check_config
from efficient_attn.registry import get_spec, list_variants
from efficient_attn.sweeps.accuracy.config import TaskSetting

__all__ = ["RecallConfig", "Point", "points"]

AXES = ("width", "budget")


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    """A sweep: the MQAR ``task`` (its model is the base), widths, the budget axis, seeds, variants."""

    preset: str
    task: TaskSetting
    widths: tuple[int, ...] = (32, 64, 128)
    budget_width: int | None = 64  # None: no budget axis
    seeds: tuple[int, ...] = (0,)
    variants: tuple[str, ...] | None = None  # None = every registered variant
    data_seed: int = 0
    checkpoint_interval_s: float = 60.0

    def __post_init__(self):
        check_config("RecallConfig", self.task.task == "mqar", f"recall is measured on MQAR, got task {self.task.task!r}")
        heads = self.task.model.num_heads
        for w in self.widths + ((self.budget_width,) if self.budget_width else ()):
            check_config("RecallConfig", isinstance(w, int) and w > 0 and w % heads == 0,
                         f"width {w!r} must be a positive multiple of the model's {heads} heads")
        check_config("RecallConfig", len(self.seeds) > 0 and all(isinstance(s, int) and s >= 0 for s in self.seeds),
                     f"seeds must be non-negative ints, got {self.seeds!r}")

    def variant_names(self) -> list[str]:
        return list(self.variants) if self.variants is not None else list_variants()


@dataclasses.dataclass(frozen=True)
class Point:
    variant: str
    axis: str  # "width" or "budget"
    value: int
    setting: TaskSetting  # the task with this point's model
    kwargs: tuple  # the variant's hyperparameters ((name, value), ...)

    @property
    def width(self) -> int:
        return self.setting.model.emb_dim

    def fingerprint(self, data_seed: int) -> str:
        return self.setting.fingerprint(self.kwargs, data_seed)


def _at_width(task: TaskSetting, width: int) -> TaskSetting:
    return dataclasses.replace(task, model=dataclasses.replace(task.model, emb_dim=width, mlp_dim=2 * width))


def points(cfg: RecallConfig, variant: str) -> list[Point]:
    """Every point of ``variant``: its widths, then its budget values (if it declares a budget)."""
    out = [Point(variant, "width", w, _at_width(cfg.task, w), ()) for w in cfg.widths]
    budget = get_spec(variant).budget
    if cfg.budget_width and budget is not None:
        at = _at_width(cfg.task, cfg.budget_width)
        for value in budget.values:
            if budget.length_like and value > cfg.task.seq_len:
                continue
            out.append(Point(variant, "budget", int(value), at, ((budget.knob, value),)))
    return out
