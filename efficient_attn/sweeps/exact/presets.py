"""The exact experiment's named presets: one factory each, called when a run starts.

``PRESETS`` (the kernel benchmark) and ``ENCODER_PRESETS`` (the encoder throughput) map a
name to its factory; tests may replace an entry with a smaller one.
"""

from __future__ import annotations

import dataclasses

from efficient_attn.sweeps.exact.config import EncoderBenchConfig, ExactConfig

__all__ = ["quick", "huge", "encoder_quick", "PRESETS", "ENCODER_PRESETS"]


def quick() -> ExactConfig:
    """CPU, about 2 minutes on 2 cores: float32, B=1, H=8, D=64; time rows at N = 1K, 2K, 4K
    (3 interleaved rounds), compiled memory at 16K, causal against non-causal at 8K."""
    return ExactConfig(preset="quick", lengths=(1024, 2048, 4096), batch=1, heads=8, head_dim=64, repeats=3,
                       memory_n=16384, causal_n=8192)


def huge() -> ExactConfig:
    """The quick rows plus one forward+backward call of ``blockwise`` at N = 65536 (minutes on
    2 cores; the O(N) memory claim tried for real). ``--huge`` is the same."""
    return dataclasses.replace(quick(), preset="huge", huge_n=65536)


def encoder_quick() -> EncoderBenchConfig:
    """CPU, about a minute: two blocks of width 128 with 4 heads, batch 4 at length 1024."""
    return EncoderBenchConfig(preset="quick", length=1024, batch=4, layers=2, emb=128, heads=4, repeats=5)


PRESETS = {"quick": quick, "huge": huge}
ENCODER_PRESETS = {"quick": encoder_quick}
