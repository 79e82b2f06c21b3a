"""The decode-cost experiment's named presets, one factory each; ``PRESETS`` holds what they return."""

from __future__ import annotations

from efficient_attn.sweeps.decode_cost.config import GiB, DecodeCostConfig

__all__ = ["quick", "cpu", "lra", "FACTORIES", "PRESETS"]


def quick() -> DecodeCostConfig:
    """CPU, about a minute and a half: contexts 1K, 4K, 16K at batch 1 and 8, a small head
    (4 heads of 32). One warm-up and 1-5 timed calls of 16 steps within 0.25 s; a step
    predicted over 0.25 s is skipped, and the deadline (a safety net on a slower or busy
    machine) stores what it does not reach as skipped, for a rerun to resume."""
    return DecodeCostConfig(
        preset="quick",
        contexts=(1024, 4096, 16384),
        batches=(1, 8),
        heads=4,
        head_dim=32,
        steps_per_call=16,
        min_repeats=1,
        max_repeats=5,
        repeat_budget_s=0.25,
        max_step_s=0.25,
        memory_budget_bytes=2 * GiB,
        sweep_budget_s=90.0,
    )


def cpu() -> DecodeCostConfig:
    """CPU, tens of minutes: contexts 1K to 64K (powers of two) at batch 1 and 8, 8 heads of
    64 (a 512-wide model's attention), 3-100 timed calls within 2 s per point.

    Up to 100 calls, not 10: a fixed-state step takes 15-50 us, so a call of 16 steps is
    under a millisecond and the median of 10 such calls moved by up to 2x between contexts
    (the first cpu run, results/decode_cost/cpu/NOTES.md); the 2 s budget keeps the
    KV-cache points at their 3-10 calls."""
    return DecodeCostConfig(
        preset="cpu",
        contexts=tuple(2**i for i in range(10, 17)),
        batches=(1, 8),
        heads=8,
        head_dim=64,
        steps_per_call=16,
        min_repeats=3,
        max_repeats=100,
        repeat_budget_s=2.0,
        max_step_s=2.0,
        memory_budget_bytes=12 * GiB,
    )


def lra() -> DecodeCostConfig:
    """An accelerator (``make reproduce PRESET=lra``): the cpu preset's contexts and shape,
    5-50 timed calls within 3 s per point."""
    return DecodeCostConfig(
        preset="lra",
        contexts=tuple(2**i for i in range(10, 17)),
        batches=(1, 8),
        heads=8,
        head_dim=64,
        steps_per_call=16,
        min_repeats=5,
        max_repeats=50,
        repeat_budget_s=3.0,
        max_step_s=2.0,
        memory_budget_bytes=60 * GiB,
    )


FACTORIES = {"quick": quick, "cpu": cpu, "lra": lra}
# The configurations (frozen): what ``--preset NAME`` runs. Tests may replace an entry.
PRESETS: dict[str, DecodeCostConfig] = {name: make() for name, make in FACTORIES.items()}
