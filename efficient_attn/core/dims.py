"""``Dims``: the sizes a variant is built with (heads, head width, longest sequence, kv heads),
checked once at construction."""

from __future__ import annotations

import dataclasses

from efficient_attn.core.checks import _is_int


@dataclasses.dataclass(frozen=True)
class Dims:
    """Sizes fixed at construction: query heads, per-head width, the longest sequence, and
    the key/value heads (``num_kv_heads``, default ``num_heads``; fewer is grouped-query
    attention and must divide ``num_heads``)."""

    num_heads: int
    head_dim: int
    max_len: int
    num_kv_heads: int | None = None

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in ("num_heads", "head_dim", "max_len", "num_kv_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"Dims.{name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}; "
                f"choose num_kv_heads among {[d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads
