"""The recall sweep's named presets, one factory each; ``PRESETS`` maps a name to its factory."""

from __future__ import annotations

import dataclasses
from typing import Callable

from efficient_attn.sweeps.accuracy import presets as accuracy_presets
from efficient_attn.sweeps.recall.config import RecallConfig

__all__ = ["cpu", "PRESETS"]


def cpu() -> RecallConfig:
    """The accuracy experiment's cpu MQAR setting (length 128, vocabulary 1024, 4-32 pairs, 2
    layers, short convolution), every registered variant at widths 32/64/128 and, at width 64,
    over its budget knob; one seed: 132 points of 2-25 minutes on 2 idle cores (the accuracy
    experiment's per-variant MQAR times, results/accuracy/cpu/NOTES.md), of which the 22 at width
    64 are the accuracy experiment's own MQAR runs and reuse their rows (``run.accuracy_rows``).
    ``--variants`` runs a family subset first."""
    mqar = next(t for t in accuracy_presets.cpu().tasks if t.task == "mqar")
    return RecallConfig(preset="cpu", task=mqar, widths=(32, 64, 128), budget_width=64, seeds=(0,))


def quick() -> RecallConfig:
    """A smoke run of the pipeline (minutes): length 64, 300 steps, widths 32/64, no budget axis."""
    mqar = next(t for t in accuracy_presets.cpu().tasks if t.task == "mqar")
    small = dataclasses.replace(
        mqar, seq_len=64, num_train=4000, num_val=200, num_test=400,
        train=dataclasses.replace(mqar.train, steps=300, warmup=30, eval_every=100),
        params=(("vocab_size", 256), ("num_pairs", 8), ("random_non_queries", False),
                ("train_num_pairs", (2, 4, 8)), ("eval_num_pairs", (2, 4, 8, 16))))
    return RecallConfig(preset="quick", task=small, widths=(32, 64), budget_width=None, seeds=(0,))


PRESETS: dict[str, Callable[[], RecallConfig]] = {"quick": quick, "cpu": cpu}
