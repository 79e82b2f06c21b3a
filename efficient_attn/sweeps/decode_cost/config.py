"""The decode-cost experiment's configuration (a frozen dataclass, one comment per field)."""

from __future__ import annotations

import dataclasses

from efficient_attn.core import check_config, check_positive_int

__all__ = ["MiB", "GiB", "DecodeCostConfig"]

MiB = 1024**2
GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class DecodeCostConfig:
    """One decode-cost sweep: for every decode-capable variant, batch and context length,
    the time of one ``step`` and the size of the decoding state.

    Points are visited context by context (every variant and batch at one context before the
    next), so that a sweep stopped by ``sweep_budget_s`` has complete columns.
    """

    preset: str = "quick"
    variants: tuple[str, ...] | None = None  # None = every registered variant with capabilities.decode
    contexts: tuple[int, ...] = (1024, 4096, 16384)  # tokens already in the state when the step runs
    batches: tuple[int, ...] = (1, 8)  # sequences decoded together
    heads: int = 4  # attention heads H (the state is per head)
    head_dim: int = 32  # per-head width d of queries, keys and values
    dtype: str = "float32"  # q, k, v and the cache storage
    steps_per_call: int = 16  # steps per timed call (a lax.scan of step): dispatch and the state's copy amortised
    warmup: int = 1  # untimed calls after compiling
    min_repeats: int = 1  # timed calls, at least
    max_repeats: int = 5  # timed calls, at most
    repeat_budget_s: float = 0.25  # no further timed call once this much has been timed
    max_step_s: float = 0.25  # skip a point whose predicted per-token step time exceeds this
    memory_budget_bytes: int = 2 * GiB  # skip a point whose state (held twice: input and output) exceeds this
    sweep_budget_s: float | None = None  # after this many seconds the remaining points are skipped
    seed: int = 0  # parameters and the synthetic state contents
    growth_rounds: int = 30  # interleaved rounds of a fixed-state step at the shortest and longest context (0: none)

    def __post_init__(self):
        for f in ("heads", "head_dim", "steps_per_call", "min_repeats", "max_repeats"):
            check_positive_int("decode_cost", f, getattr(self, f))
        check_config("decode_cost", self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        check_config("decode_cost", isinstance(self.growth_rounds, int) and self.growth_rounds >= 0,
                     f"growth_rounds must be an int >= 0, got {self.growth_rounds!r}")
        check_config("decode_cost", self.max_repeats >= self.min_repeats,
                     f"max_repeats={self.max_repeats} must be >= min_repeats={self.min_repeats}")
        for field in ("contexts", "batches"):
            values = getattr(self, field)
            check_config("decode_cost", len(values) > 0 and all(isinstance(n, int) and n > 0 for n in values),
                         f"{field} must be positive ints, got {values!r}")
        check_config("decode_cost", self.dtype in ("float32", "bfloat16"),
                     f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        check_config("decode_cost", self.max_step_s > 0 and self.repeat_budget_s >= 0,
                     f"max_step_s must be > 0 and repeat_budget_s >= 0, got {self.max_step_s}, {self.repeat_budget_s}")

    @property
    def max_len(self) -> int:
        """The modules' max_len: the longest context plus the steps of one timed call."""
        return max(self.contexts) + self.steps_per_call
