"""The cost experiment's named presets, one factory each; ``PRESETS`` holds what they return.

How each preset came to its sizes (the runs behind them, at which commit) is written up in
``results/cost/<preset>/NOTES.md``.
"""

from __future__ import annotations

from efficient_attn.sweeps.cost.config import (GiB, CostConfig, InterfaceConfig, SlopesConfig, Table2Config,
                                               TokensConfig)

__all__ = ["quick", "cpu", "lra", "FACTORIES", "PRESETS"]


def quick() -> CostConfig:
    """CPU, minutes: every variant at N = 256, 1024, 4096, 16384.

    Lengths a factor 4 apart are enough for the slopes and the crossovers, and on a small CPU
    compiling is most of the run, so every extra length is costly; 16K is where a quadratic
    term hidden below 8K shows (the tail slope, 1K-16K). One warm-up and 3-5 timed calls
    within 0.25 s, never fewer than 3: the first calls after a compile at 16K can take a
    transient stall of 2-6x (seen on performer's and local's forward+backward), which a
    one-call "median" reported as the point's time and a median of three does not; no call
    predicted over 8 s (the quadratic variants stop there at 16K,
    with the reason stored; at 3 s a dozen subquadratic forward+backward points at 16K
    stopped too). The interface part (grouped-query
    heads, packed against padded, 8 equal sequences packed against padded) runs at 1K and 4K,
    56 points, about two minutes on 2 cores (most of it the quadratic reference at 4K), with a
    150 s deadline. Table 2 is scaled down to one layer of width 64 at batch 1, at 1K and 4K
    (the ends of LRA's range). The fixed-token control (forward and forward+backward, B x N =
    16K at N = 1K and 4K) adds ~140 points, about six minutes, with a 600 s deadline. The
    interleaved slope check (``slopes.py``: each O(N) or O(N log N) series at 1K, 4K and 16K
    timed round-robin, 5 rounds, forward and forward+backward) has a 900 s deadline. The
    deadlines are a safety net for a slower machine: what they do not reach is stored as
    skipped, and a rerun resumes it.
    """
    return CostConfig(
        preset="quick",
        lengths=(256, 1024, 4096, 16384),
        min_repeats=3,
        max_repeats=5,
        repeat_budget_s=0.25,
        max_call_s=8.0,
        max_compile_s=15.0,
        memory_budget_bytes=3 * GiB,
        sweep_budget_s=1500.0,
        interface=InterfaceConfig(min_length=1024, max_length=4096, budget_s=150.0),
        tokens=TokensConfig(tokens=16384, lengths=(1024, 4096), passes=("fwd", "fwd_bwd"), budget_s=600.0),
        slopes=SlopesConfig(enabled=True, lengths=(1024, 4096, 16384), passes=("fwd", "fwd_bwd"), rounds=5,
                            budget_s=900.0),
        table2=Table2Config(lengths=(1024, 4096), batch=1, num_layers=1, emb_dim=64, num_heads=2,
                            mlp_dim=128, min_repeats=1, max_repeats=3, step_budget_s=0.3, max_step_s=5.0,
                            memory_budget_bytes=3 * GiB, budget_s=120.0),
    )


def cpu() -> CostConfig:
    """CPU, hours: N from 256 to 65536 or until a budget stops a series; more repeats; the
    interface part from 1K to 16K; Table 2 at half LRA's width."""
    return CostConfig(
        preset="cpu",
        lengths=tuple(2**i for i in range(8, 17)),
        min_repeats=3,
        max_repeats=20,
        repeat_budget_s=5.0,
        max_call_s=60.0,
        max_compile_s=300.0,
        memory_budget_bytes=12 * GiB,
        interface=InterfaceConfig(min_length=1024, max_length=16384),
        tokens=TokensConfig(tokens=65536, lengths=(1024, 4096, 16384), passes=("fwd", "fwd_bwd")),
        slopes=SlopesConfig(enabled=True, lengths=(4096, 16384, 65536), passes=("fwd", "fwd_bwd"), rounds=5),
        table2=Table2Config(batch=8, num_layers=2, emb_dim=128, num_heads=4, mlp_dim=512,
                            min_repeats=3, max_repeats=10, step_budget_s=5.0, max_step_s=60.0,
                            memory_budget_bytes=12 * GiB),
    )


def lra() -> CostConfig:
    """An accelerator: N from 1024 to 65536; the interface part up to 32K; Table 2 at LRA's text
    configuration (4 layers, width 256, 4 heads, MLP 1024, batch 32)."""
    return CostConfig(
        preset="lra",
        lengths=tuple(2**i for i in range(10, 17)),
        min_repeats=5,
        max_repeats=50,
        repeat_budget_s=3.0,
        max_call_s=30.0,
        max_compile_s=600.0,
        memory_budget_bytes=60 * GiB,
        interface=InterfaceConfig(min_length=1024, max_length=32768),
        tokens=TokensConfig(tokens=65536, lengths=(1024, 4096, 16384), passes=("fwd", "fwd_bwd")),
        table2=Table2Config(min_repeats=5, max_repeats=50, step_budget_s=5.0, max_step_s=30.0,
                            memory_budget_bytes=60 * GiB),
    )


FACTORIES = {"quick": quick, "cpu": cpu, "lra": lra}
# The configurations themselves (frozen, so one shared instance each is safe): what
# ``--preset NAME`` runs. Tests may replace an entry to run a preset at a smaller size.
PRESETS: dict[str, CostConfig] = {name: make() for name, make in FACTORIES.items()}
