"""The approximation experiment's named presets, one factory each (``PRESETS[name]()``).

The runs behind their sizes are written up in ``results/approximation/<preset>/NOTES.md``.
"""

from __future__ import annotations

from typing import Callable

from efficient_attn.sweeps.approximation.config import ApproxConfig, TrainedInput

__all__ = ["quick", "cpu", "lra", "PRESETS"]


def quick() -> ApproxConfig:
    """CPU, about a minute: N = 128, 3 budget values per variant, bidirectional only, fast
    compiles, and a model trained 150 steps for input (b)."""
    return ApproxConfig(preset="quick", seq_len=128, budget_points=3, fast_compile=True,
                        trained=TrainedInput(num_train=1000, steps=150))


def cpu() -> ApproxConfig:
    """CPU, tens of minutes: N = 1024, every budget value, causal too."""
    return ApproxConfig(preset="cpu", seq_len=1024, causal=(False, True),
                        trained=TrainedInput(num_train=5000, steps=1000))


def lra() -> ApproxConfig:
    """An accelerator: ListOps at LRA's length (2000 tokens + CLS, padded to 2048) and model
    (4 layers, 8 heads of 64, MLP 1024), with fewer training steps than LRA's 5000."""
    return ApproxConfig(preset="lra", seq_len=2048, batch=4, num_heads=8, head_dim=64, causal=(False, True),
                        trained=TrainedInput(num_train=20000, steps=2000, num_layers=4, mlp_dim=1024,
                                             task_params=()))


# name -> factory; a test may replace an entry to run a preset at a smaller size.
PRESETS: dict[str, Callable[[], ApproxConfig]] = {"quick": quick, "cpu": cpu, "lra": lra}
