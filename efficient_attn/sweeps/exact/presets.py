"""The exact experiment's named presets: one factory each, called when a run starts.

``PRESETS`` (the kernel benchmark) and ``ENCODER_PRESETS`` (the encoder throughput) map a
name to its factory; tests may replace an entry with a smaller one.
"""

from __future__ import annotations

import dataclasses

from efficient_attn.sweeps.exact.config import PEERS, EncoderBenchConfig, ExactConfig

__all__ = ["quick", "huge", "peers", "encoder_quick", "PRESETS", "ENCODER_PRESETS"]


def quick() -> ExactConfig:
    """CPU, about 2 minutes on 2 cores: float32, B=1, H=8, D=64; time rows at N = 1K, 2K, 4K
    (3 interleaved rounds), compiled memory at 16K, causal against non-causal at 8K."""
    return ExactConfig(preset="quick", lengths=(1024, 2048, 4096), batch=1, heads=8, head_dim=64, repeats=3,
                       memory_n=16384, causal_n=8192)


def huge() -> ExactConfig:
    """The quick rows plus one forward+backward call of ``blockwise`` at N = 65536 (minutes on
    2 cores; the O(N) memory claim tried for real). ``--huge`` is the same."""
    return dataclasses.replace(quick(), preset="huge", huge_n=65536)


def peers() -> ExactConfig:
    """blockwise against the JAX peers (``make bench-peers`` installs them: the extra ``peers``):
    float32, B=1, H=8, D=64, N = 1K-8K, non-causal and causal, forward and forward+backward
    (16 rows), written to results/exact/peers/.

    Sized for about 15 minutes on 2 cores: each timed call right after one untimed call of
    the same program (settle=1, as the quick table times), the first untimed call being the
    check against ``full`` too (so warmup=0); medians of 3 interleaved rounds up to 4K and one
    round at 8K, where by the issue's per-call figures (forward+backward jax.nn 9.4 s,
    memory-efficient-attention 11.5 s, tokamax xla_chunked 10.6 s) one round of the row's
    programs takes about a minute. A peer whose checked call took over 20 s (twice the
    slowest expected) is not timed in that cell, so a pathological peer cannot take the run
    far past its time. Compiled temporary memory of one program is at most 10.5 GiB (full,
    causal forward+backward at 8K), one at a time."""
    return dataclasses.replace(quick(), preset="peers", lengths=(1024, 2048, 4096, 8192), repeats=3, warmup=0,
                               peers=PEERS, peer_causal=(False, True), peer_settle=1, peer_call_budget_s=20.0,
                               peer_one_round_from_n=8192)


def encoder_quick() -> EncoderBenchConfig:
    """CPU, about a minute: two blocks of width 128 with 4 heads, batch 4 at length 1024."""
    return EncoderBenchConfig(preset="quick", length=1024, batch=4, layers=2, emb=128, heads=4, repeats=5)


PRESETS = {"quick": quick, "huge": huge, "peers": peers}
ENCODER_PRESETS = {"quick": encoder_quick}
