"""The cost experiment's configuration: one sweep of kernel points, the interface part
(grouped-query heads, packed against padded batches) and the LRA Table 2 analog."""

from __future__ import annotations

import dataclasses

from efficient_attn.core import check_config, check_positive_int

__all__ = ["PASSES", "PASS_TITLES", "LAYOUTS", "INTERFACE_KINDS", "PACKING_KINDS", "MiB", "GiB", "InterfaceConfig",
           "TokensConfig", "SlopesConfig", "Table2Config", "CostConfig", "config_from_dict"]

PASSES = ("fwd", "fwd_bwd")
PASS_TITLES = {"fwd": "Forward", "fwd_bwd": "Forward + backward"}
LAYOUTS = ("packed", "padded")  # the two layouts of the same tokens in the packing rows
INTERFACE_KINDS = ("gqa", "packing", "packing_equal")  # the interface part's kinds of rows (InterfaceConfig)
PACKING_KINDS = ("packing", "packing_equal")  # those measured in both LAYOUTS
MiB = 1024**2
GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class InterfaceConfig:
    """The interface part: what grouped-query heads and packed batches cost (``interface.py``).

    Measured for the registry's exact baselines (``analysis.baselines``: full, blockwise) that
    have the capability, at those of the sweep's ``lengths`` within [min_length, max_length],
    bidirectional, each of the sweep's passes, with its batch, head_dim, dtype and timing
    protocol, under its max_call_s / max_compile_s / memory_budget_bytes:

    "gqa" rows:     ``heads`` query heads and each of ``kv_heads`` key/value heads.
    "packing" rows: seeded segment lengths in [lo * N, hi * N] (``segment_range``) summing to
                    N, as one packed row of N tokens with sorted segment ids, and as a padded
                    batch of one row per segment (the longest one's length, kv_mask/q_mask).
    "packing_equal" rows: the same two layouts of ``equal_segments`` sequences of N / k tokens
                    each (8 of 1K at N = 8K: the issue's case, whose ideal is 1/k of the
                    unsegmented cost); None leaves them out.
    budget_s:       after this many seconds of interface work, the rest is skipped (a rerun resumes).
    """

    enabled: bool = True
    min_length: int = 1024
    max_length: int = 16384
    heads: int = 8
    kv_heads: tuple[int, ...] = (8, 2, 1)
    segment_range: tuple[float, float] = (1 / 16, 1 / 4)
    equal_segments: int | None = 8
    budget_s: float | None = None

    def __post_init__(self):
        check_positive_int("cost/interface", "heads", self.heads)
        check_config("cost/interface", isinstance(self.min_length, int) and isinstance(self.max_length, int)
                     and 0 < self.min_length <= self.max_length,
                     f"need 0 < min_length <= max_length, got {self.min_length}, {self.max_length}")
        check_config("cost/interface", len(self.kv_heads) > 0 and all(
            isinstance(g, int) and g > 0 and self.heads % g == 0 for g in self.kv_heads),
                     f"kv_heads must be positive divisors of heads={self.heads}, got {self.kv_heads!r}")
        lo, hi = self.segment_range
        check_config("cost/interface", 0 < lo <= hi <= 1,
                     f"segment_range must be fractions of N with 0 < lo <= hi <= 1, got {self.segment_range!r}")
        k = self.equal_segments
        check_config("cost/interface", k is None or (isinstance(k, int) and k > 1 and self.min_length % k == 0),
                     f"equal_segments must be None or an int > 1 dividing min_length={self.min_length} (N / k tokens "
                     f"each), got {self.equal_segments!r}")
        check_config("cost/interface", self.budget_s is None or self.budget_s >= 0,
                     f"budget_s must be None or >= 0, got {self.budget_s!r}")


@dataclasses.dataclass(frozen=True)
class TokensConfig:
    """The fixed-token control (``tokens.py``): every subquadratic variant at B x N = ``tokens``,
    for each N of ``lengths`` (B = tokens / N), in the sweep's masking modes and these
    ``passes``, beside the sweep's own (B = 1, N = tokens) point; skipped when ``tokens`` is
    not one of the sweep's lengths. ``budget_s``: after this many seconds the rest is skipped."""

    enabled: bool = True
    tokens: int = 16384
    lengths: tuple[int, ...] = (1024, 4096)
    passes: tuple[str, ...] = ("fwd",)
    budget_s: float | None = None

    def __post_init__(self):
        check_positive_int("cost/tokens", "tokens", self.tokens)
        check_config("cost/tokens", all(isinstance(n, int) and 0 < n < self.tokens and self.tokens % n == 0
                                        for n in self.lengths),
                     f"lengths must divide tokens={self.tokens} (B = tokens / N) and be shorter, got {self.lengths!r}")
        check_config("cost/tokens", set(self.passes) <= set(PASSES) and bool(self.passes),
                     f"passes must be a non-empty subset of {PASSES}, got {self.passes!r}")


@dataclasses.dataclass(frozen=True)
class SlopesConfig:
    """The interleaved slope check (``slopes.py``): every variant claiming O(N) or O(N log N)
    time (a claimed exponent up to ``max_claim`` at the longest length), its ``lengths`` timed
    round-robin in one process, ``rounds`` calls each, in the sweep's masking modes and these
    ``passes``; skipped when ``lengths`` are not all among the sweep's (a run narrowed with
    ``--lengths``). ``budget_s``: after this many seconds the remaining series are skipped."""

    enabled: bool = False
    lengths: tuple[int, ...] = (1024, 4096, 16384)
    passes: tuple[str, ...] = ("fwd",)
    rounds: int = 5
    max_claim: float = 1.15
    budget_s: float | None = None

    def __post_init__(self):
        check_positive_int("cost/slopes", "rounds", self.rounds)
        check_config("cost/slopes", len(set(self.lengths)) >= 2 and all(isinstance(n, int) and n > 0
                                                                        for n in self.lengths),
                     f"lengths must be at least two distinct positive ints, got {self.lengths!r}")
        check_config("cost/slopes", set(self.passes) <= set(PASSES) and bool(self.passes),
                     f"passes must be a non-empty subset of {PASSES}, got {self.passes!r}")
        check_config("cost/slopes", self.budget_s is None or self.budget_s >= 0,
                     f"budget_s must be None or >= 0, got {self.budget_s!r}")


@dataclasses.dataclass(frozen=True)
class Table2Config:
    """The LRA Table 2 analog: the byte-level text classifier, trained, at lengths 1K-4K.

    LRA's text configuration is 4 layers, width 256, 4 heads, MLP 1024, batch 32 (reference
    table); presets scale it down with these fields. ``step_budget_s`` bounds the timed steps
    of one point, ``max_step_s`` skips a length whose predicted step time exceeds it.
    """

    enabled: bool = True
    lengths: tuple[int, ...] = (1024, 2048, 3072, 4096)  # visited in this order (tables sort them)
    batch: int = 32
    num_layers: int = 4
    emb_dim: int = 256
    num_heads: int = 4
    mlp_dim: int = 1024
    warmup: int = 1
    min_repeats: int = 2
    max_repeats: int = 10
    step_budget_s: float = 2.0
    max_step_s: float = 10.0
    memory_budget_bytes: int = 64 * GiB
    budget_s: float | None = None  # after this many seconds of Table 2 work, the rest is skipped

    def __post_init__(self):
        for f in ("batch", "num_layers", "emb_dim", "num_heads", "mlp_dim", "min_repeats", "max_repeats"):
            check_positive_int("cost/table2", f, getattr(self, f))
        check_config("cost/table2", all(isinstance(n, int) and n > 0 for n in self.lengths),
                     f"lengths must be positive ints, got {self.lengths!r}")
        check_config("cost/table2", self.emb_dim % self.num_heads == 0,
                     f"emb_dim={self.emb_dim} must be divisible by num_heads={self.num_heads}")


@dataclasses.dataclass(frozen=True)
class CostConfig:
    """One cost sweep. Points are visited mode by mode (forward bidirectional, forward+backward
    bidirectional, then the causal ones), each mode in increasing length with every variant at
    one length before the next; a sweep stopped by ``sweep_budget_s`` therefore has complete
    curves, for every variant, in the modes it reached.

    variants:            names (None = every registered variant, plugins included)
    lengths:             sequence lengths N (T = S = N)
    passes:              subset of ("fwd", "fwd_bwd")
    causal_modes:        subset of (False, True); each only where the variant's capabilities allow it
    batch/heads/head_dim/dtype: the q, k, v shape [batch, N, heads, head_dim] and dtype
    warmup, min_repeats, max_repeats, repeat_budget_s: the timing protocol of one point
    max_call_s:          skip a point whose predicted time per call exceeds this (seconds)
    max_compile_s:       skip the longer lengths of a series once one compile took longer than this
    memory_budget_bytes: skip a point whose compiled memory exceeds this
    sweep_budget_s:      after this many seconds, the remaining points are skipped (None = no limit)
    interface:           the grouped-query and packed-batch rows (``InterfaceConfig``)
    tokens:              the fixed-token control of the slopes (``TokensConfig``)
    slopes:              the interleaved slope check (``SlopesConfig``)
    table2:              the LRA Table 2 analog (``Table2Config``)
    """

    preset: str = "quick"
    variants: tuple[str, ...] | None = None
    lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    passes: tuple[str, ...] = PASSES
    causal_modes: tuple[bool, ...] = (False, True)
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    warmup: int = 1
    min_repeats: int = 2
    max_repeats: int = 10
    repeat_budget_s: float = 1.0
    max_call_s: float = 3.0
    max_compile_s: float = 60.0
    memory_budget_bytes: int = 4 * GiB
    sweep_budget_s: float | None = None
    seed: int = 0
    matmul_n: int = 2048
    interface: InterfaceConfig = InterfaceConfig()
    tokens: TokensConfig = TokensConfig()
    slopes: SlopesConfig = SlopesConfig()
    table2: Table2Config = Table2Config()

    def __post_init__(self):
        for f in ("batch", "heads", "head_dim", "min_repeats", "max_repeats", "matmul_n"):
            check_positive_int("cost", f, getattr(self, f))
        check_config("cost", self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        check_config("cost", self.max_repeats >= self.min_repeats,
                     f"max_repeats={self.max_repeats} must be >= min_repeats={self.min_repeats}")
        check_config("cost", len(self.lengths) > 0 and all(isinstance(n, int) and n > 0 for n in self.lengths),
                     f"lengths must be positive ints, got {self.lengths!r}")
        check_config("cost", set(self.passes) <= set(PASSES) and self.passes,
                     f"passes must be a non-empty subset of {PASSES}, got {self.passes!r}")
        check_config("cost", set(self.causal_modes) <= {False, True} and self.causal_modes,
                     f"causal_modes must be a non-empty subset of (False, True), got {self.causal_modes!r}")
        check_config("cost", self.dtype in ("float32", "bfloat16", "float16"),
                     f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        check_config("cost", self.max_call_s > 0 and self.repeat_budget_s >= 0,
                     f"max_call_s must be > 0 and repeat_budget_s >= 0, got {self.max_call_s}, {self.repeat_budget_s}")


def config_from_dict(stored: dict) -> CostConfig:
    """The ``CostConfig`` that ``dataclasses.asdict`` wrote into a rows.json (lists back to
    tuples, the nested configs rebuilt); a field the current code does not know raises
    ValueError, one it added since takes its default."""
    def rebuild(cls, values: dict):
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"cost: the stored config has fields {unknown} that {cls.__name__} does not know")
        kwargs = {}
        for name, value in values.items():
            default = known[name].default
            if dataclasses.is_dataclass(default) and isinstance(value, dict):
                value = rebuild(type(default), value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)
    return rebuild(CostConfig, stored)
