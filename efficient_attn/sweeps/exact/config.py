"""The exact experiment's configurations (frozen dataclasses, one comment per field).

``ExactConfig`` is the kernel benchmark (``full``, ``blockwise`` and
``jax.nn.dot_product_attention`` side by side; with ``peers`` set, blockwise against the JAX
peers instead); ``EncoderBenchConfig`` the model-level throughput comparison of the ``full``
encoder with Flax's own attention.
"""

from __future__ import annotations

import dataclasses

from efficient_attn.core import check_config, check_positive_int

__all__ = ["IMPLS", "MEMORY_IMPLS", "PASSES", "PEERS", "PEER_BASELINES", "ExactConfig", "EncoderBenchConfig",
           "ENCODER_MODELS"]

# The implementations timed side by side, in the order of the table's columns.
IMPLS = ("jax.nn.dot_product_attention", "full", "blockwise")
# Compiled memory is read for these only: full's einsum holds the same N x N scores as
# dot_product_attention, so a third 16K compile would repeat that column at its cost.
MEMORY_IMPLS = ("jax.nn.dot_product_attention", "blockwise")
PASSES = ("fwd", "fwd_bwd")
# The peers a peers row may time (efficient_attn/sweeps/exact/peers.py loads each), in column
# order, after the two every peers row times: ours and JAX's own.
PEERS = ("tokamax.xla", "tokamax.xla_chunked", "memory_efficient_attention", "ringattention")
PEER_BASELINES = ("blockwise", "jax.nn.dot_product_attention")


@dataclasses.dataclass(frozen=True)
class ExactConfig:
    """One run of the kernel benchmark: every unit below is one stored row.

    - a time row per (N, pass): the three implementations and the f32 matmul reference
      compiled, warmed up, then timed in interleaved rounds (one call of each per round), so
      that the ratios of a row come from the same minutes of the same process;
    - a memory row at ``memory_n`` (compile only);
    - a causal row at ``causal_n``: ``blockwise`` forward, causal and not, interleaved;
    - a huge row at ``huge_n`` when set: one forward+backward call of ``blockwise``.

    With ``peers`` set (the peers preset) the units are peers rows instead, one per (causal,
    N, pass): blockwise, ``jax.nn.dot_product_attention`` and each peer checked against
    ``full`` and timed in the same rounds with the matmul (``peer_rows``); ``memory_n``,
    ``causal_n`` and ``huge_n`` are then unused.
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
    peers: tuple[str, ...] = ()  # names from PEERS: peers rows instead of the rows above (() = none)
    peer_causal: tuple[bool, ...] = (False, True)  # peers rows: non-causal (False) and / or causal (True)
    peer_settle: int = 1  # peers rows: untimed calls of a program right before each timed one (timing.py)
    peer_call_budget_s: float | None = None  # peers rows: a peer whose first call took longer is not timed
    peer_one_round_from_n: int | None = None  # peers rows at N >= this: one round, not ``repeats`` (None: never)

    def __post_init__(self):
        for f in ("batch", "heads", "head_dim", "repeats", "memory_n", "causal_n", "matmul_n"):
            check_positive_int("exact", f, getattr(self, f))
        check_config("exact", self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        check_config("exact", len(self.lengths) > 0 and all(isinstance(n, int) and n > 0 for n in self.lengths),
                     f"lengths must be positive ints, got {self.lengths!r}")
        if self.huge_n is not None:
            check_positive_int("exact", "huge_n", self.huge_n)
        if self.peers:
            self._check_peers()

    def peer_rounds(self, n: int) -> int:
        """The interleaved rounds of a peers row at ``n``: ``repeats``, or 1 from ``peer_one_round_from_n``."""
        return 1 if self.peer_one_round_from_n is not None and n >= self.peer_one_round_from_n else self.repeats

    def _check_peers(self) -> None:
        unknown = [p for p in self.peers if p not in PEERS]
        check_config("exact", not unknown, f"peers: unknown {unknown}; the peers are {', '.join(PEERS)}")
        check_config("exact", len(set(self.peers)) == len(self.peers), f"peers repeat a name: {self.peers!r}")
        check_config("exact", len(self.peer_causal) > 0 and len(set(self.peer_causal)) == len(self.peer_causal)
                     and all(isinstance(c, bool) for c in self.peer_causal),
                     f"peer_causal must be distinct bools, e.g. (False, True), got {self.peer_causal!r}")
        check_positive_int("exact", "peer_settle", self.peer_settle, minimum=0)
        check_config("exact", self.warmup + self.peer_settle >= 1,
                     "peers rows check each program's first untimed call against full: set warmup or peer_settle >= 1")
        check_config("exact", self.peer_call_budget_s is None or self.peer_call_budget_s > 0,
                     f"peer_call_budget_s must be > 0 seconds or None, got {self.peer_call_budget_s!r}")
        check_config("exact", self.peer_one_round_from_n is None or (isinstance(self.peer_one_round_from_n, int)
                                                                     and self.peer_one_round_from_n > 0),
                     f"peer_one_round_from_n must be a positive int or None, got {self.peer_one_round_from_n!r}")
        check_config("exact", self.huge_n is None, "huge_n: the peers rows have no huge row; leave it None")


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
