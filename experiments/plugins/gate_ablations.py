"""Ablations of the gated recurrences' gates, as plugin variants (``--plugin`` this file).

Each is a registered variant with other defaults or one changed line, so the accuracy
experiment trains it like any other; the committed rows of the ``cpu`` preset keep the
registered defaults. Used for results/accuracy/cpu/NOTES.md ("gla and mamba2 on MQAR"):

    python experiments/accuracy.py --preset cpu --plugin experiments/plugins/gate_ablations.py \
        --variants gla_key_gate,gla_key_gate_tau64,mamba2_narrow_init,mamba2_rms_dt \
        --tasks mqar --seeds 0 --out results/accuracy/cpu_gate_ablations

- ``gla_key_gate``: gla with its gate read from the raw key (``gate_input_norm=False``), the
  form before the RMS normalisation of the gate input.
- ``gla_key_gate_tau64``: the same with tau = 64 (four times slower initial forgetting), to
  tell the gate's initial decay from its coupling to the key's scale.
- ``mamba2_narrow_init``: mamba2 with initial dt in [1e-3, 1e-2] and A in [1, 2] instead of the
  paper's [1e-3, 1e-1] and [1, 16] (initial decays exp(-dt A) per token much nearer 1).
- ``mamba2_rms_dt``: mamba2 with dt computed from the RMS-normalised key (gla's fix, applied
  to mamba2's step size).
"""

import dataclasses

from efficient_attn.registry import register
from efficient_attn.ops.feature_norms import rms_normalise
from efficient_attn.variants.gated import GLA, GLAConfig, Mamba2, Mamba2Config


@dataclasses.dataclass(frozen=True)
class KeyGateConfig(GLAConfig):
    gate_input_norm: bool = False


@dataclasses.dataclass(frozen=True)
class KeyGateTau64Config(GLAConfig):
    gate_input_norm: bool = False
    gate_temperature: float = 64.0


@dataclasses.dataclass(frozen=True)
class NarrowInitConfig(Mamba2Config):
    dt_max: float = 1e-2
    a_max: float = 2.0


@register("gla_key_gate", config=KeyGateConfig)
class GLAKeyGate(GLA):
    """gla with the gate read from the raw key (no RMS normalisation)."""


@register("gla_key_gate_tau64", config=KeyGateTau64Config)
class GLAKeyGateTau64(GLA):
    """gla with the gate read from the raw key, tau = 64."""


@register("mamba2_narrow_init", config=NarrowInitConfig)
class Mamba2NarrowInit(Mamba2):
    """mamba2 with initial dt in [1e-3, 1e-2] and A in [1, 2]."""


@register("mamba2_rms_dt", config=Mamba2Config)
class Mamba2RmsDt(Mamba2):
    """mamba2 with dt from the RMS-normalised key."""

    def step_sizes(self, k):
        return super().step_sizes(rms_normalise(k.astype("float32"), 1e-6))
