"""The exact experiment's configurations (frozen dataclasses, one comment per field).

``ExactConfig`` is the kernel benchmark (``full``, ``blockwise`` and
``jax.nn.dot_product_attention`` side by side); ``EncoderBenchConfig`` the model-level
throughput comparison of the ``full`` encoder with Flax's own attention.
"""

from __future__ import annotations

import dataclasses

from efficient_attn.core import check_config, check_positive_int

__all__ = ["IMPLS", "MEMORY_IMPLS", "PASSES", "ExactConfig", "EncoderBenchConfig", "ENCODER_MODELS"]

# The implementations timed side by side, in the order of the table's columns.
IMPLS = ("jax.nn.dot_product_attention", "full", "blockwise")
# Compiled memory is read for these only: full's einsum holds the same N x N scores as
# dot_product_attention, so a third 16K compile would repeat that column at its cost.
MEMORY_IMPLS = ("jax.nn.dot_product_attention", "blockwise")
PASSES = ("fwd", "fwd_bwd")


@dataclasses.dataclass(frozen=True)
class ExactConfig:
    """One run of the kernel benchmark: every unit below is one stored row.

    - a time row per (N, pass): the three implementations and the f32 matmul reference
      compiled, warmed up, then timed in interleaved rounds (one call of each per round), so
      that the ratios of a row come from the same minutes of the same process;
    - a memory row at ``memory_n`` (compile only);
    - a causal row at ``causal_n``: ``blockwise`` forward, causal and not, interleaved;
    - a huge row at ``huge_n`` when set: one forward+backward call of ``blockwise``.
    """

    preset: str = "quick"
    lengths: tuple[int, ...] = (1024, 2048, 4096)  # N of the time rows (T = S = N)
    batch: int = 1  # B
    heads: int = 8  # H
    head_dim: int = 64  # D
    repeats: int = 3  # timed rounds per time / causal row (the median is reported)
    warmup: int = 1  # untimed calls of each program before the first round
    memory_n: int = 16384  # N of the compile-only memory row
    causal_n: int = 8192  # N of the causal-against-non-causal row
    huge_n: int | None = None  # N of the single forward+backward call of blockwise (None: no such row)
    matmul_n: int = 2048  # the f32 matmul reference (matmul_n^3) timed in every time row's rounds

    def __post_init__(self):
        for f in ("batch", "heads", "head_dim", "repeats", "memory_n", "causal_n", "matmul_n"):
            check_positive_int("exact", f, getattr(self, f))
        check_config("exact", self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        check_config("exact", len(self.lengths) > 0 and all(isinstance(n, int) and n > 0 for n in self.lengths),
                     f"lengths must be positive ints, got {self.lengths!r}")
        if self.huge_n is not None:
            check_positive_int("exact", "huge_n", self.huge_n)


# The encoders compared, in the table's order: Flax's attention, then ours as models run it
# (fast_exact: the exact path on the blockwise kernel) and on the readable einsum.
ENCODER_MODELS = ("flax_nnx_mha", "full", "full_einsum")


@dataclasses.dataclass(frozen=True)
class EncoderBenchConfig:
    """The encoder throughput row: three ``nn.Classifier`` encoders of the same sizes and seed,
    their training step (forward + backward + AdamW) and forward timed in interleaved rounds."""

    preset: str = "quick"
    length: int = 1024  # tokens per sequence
    batch: int = 4  # sequences per step (the last ones padded, 7 tokens more each)
    layers: int = 2  # encoder blocks
    emb: int = 128  # model width (MLP 2x)
    heads: int = 4  # attention heads
    repeats: int = 5  # timed rounds (the median is reported)
    warmup: int = 1  # untimed calls of each program before the first round
    vocab_size: int = 256
    num_classes: int = 10

    def __post_init__(self):
        for f in ("length", "batch", "layers", "emb", "heads", "repeats", "vocab_size", "num_classes"):
            check_positive_int("exact encoder", f, getattr(self, f))
        check_config("exact encoder", self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        check_config("exact encoder", self.emb % self.heads == 0,
                     f"emb={self.emb} must be a multiple of heads={self.heads}")
        check_config("exact encoder", self.length > 7 * (self.batch - 1),
                     f"length={self.length} must exceed the padding of the last sequence, 7 * (batch - 1) = "
                     f"{7 * (self.batch - 1)}")
