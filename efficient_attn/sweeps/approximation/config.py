"""The approximation experiment's configuration: the inputs, the sizes, the budgets' thinning."""

from __future__ import annotations

import dataclasses

from efficient_attn.core import check_config, check_positive_int

__all__ = ["SCALE_NAMES", "TrainedInput", "ApproxConfig"]

SCALE_NAMES = {0.25: "flat", 1.0: "moderate", 4.0: "peaked"}


@dataclasses.dataclass(frozen=True)
class TrainedInput:
    """Input (b): a small exact-reference Classifier trained on a task; q, k, v captured at ``layer``.

    The model has the sweep's heads and head width, and sequences of ``seq_len - 1`` tokens
    (+ CLS = ``seq_len``); ``batch`` test examples (those with the least padding) are used.
    The shapes then equal the Gaussian inputs', so both share one compiled function.
    """

    task: str = "listops"
    num_train: int = 2000
    steps: int = 300
    layer: int = -1
    num_layers: int = 2
    mlp_dim: int = 128
    task_params: tuple = (("max_depth", 6),)

    def __post_init__(self):
        for f in ("num_train", "steps", "num_layers", "mlp_dim"):
            check_positive_int("TrainedInput", f, getattr(self, f))
        check_config("TrainedInput", -self.num_layers <= self.layer < self.num_layers,
                     f"layer must index one of {self.num_layers} layers, got {self.layer}")


@dataclasses.dataclass(frozen=True)
class ApproxConfig:
    """One sweep.

    seq_len, num_heads, head_dim, batch: the q, k, v shape [batch, seq_len, num_heads, head_dim]
    q_scales:      Gaussian inputs with q scaled so that the logits' standard deviation is this
    seeds:         each seed draws new inputs and a new module initialisation (mean ± std over them)
    causal:        the maskings of the Gaussian inputs (each where the variant has it)
    budget_points: keep at most this many values of each budget, evenly spread (None = all)
    variants:      names (None = every registered variant, plugins included)
    pattern_len:   N of the attention-pattern picture
    trained:       input (b), or None to skip it
    fast_compile:  XLA optimisation level 0: many small probes compile faster
    """

    preset: str
    seq_len: int = 256
    num_heads: int = 2
    head_dim: int = 32
    batch: int = 2
    q_scales: tuple[float, ...] = (0.25, 1.0, 4.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    causal: tuple[bool, ...] = (False,)
    budget_points: int | None = None
    variants: tuple[str, ...] | None = None
    pattern_len: int = 64
    trained: TrainedInput | None = TrainedInput()
    fast_compile: bool = False

    def __post_init__(self):
        for f in ("seq_len", "num_heads", "head_dim", "batch", "pattern_len"):
            check_positive_int("ApproxConfig", f, getattr(self, f))
        check_config("ApproxConfig", len(self.seeds) > 0, "seeds must not be empty")
        check_config("ApproxConfig", len(self.q_scales) > 0 and all(s > 0 for s in self.q_scales),
                     f"q_scales must be positive, got {self.q_scales}")
        if self.budget_points is not None:
            check_positive_int("ApproxConfig", "budget_points", self.budget_points, minimum=2)
