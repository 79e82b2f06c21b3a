"""What the approximation sweep measures: every (input, variant, budget value, masking).

Each variant's budget comes from its registration (``VariantSpec.budget``: the knob, the
values, whether they count tokens); a variant without one gets one row at its defaults. The
views ``budgets``, ``length_like_knobs``, ``pattern_settings`` and ``learned`` read the
registry; the experiment keeps no table of its own keyed by variant names.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np

from efficient_attn import registry, report
from efficient_attn.core import Capabilities
from efficient_attn.sweeps.approximation.config import ApproxConfig

__all__ = ["budgets", "length_like_knobs", "pattern_settings", "learned", "budget_of", "plan_units", "unit_key",
           "skip_key"]


def budgets() -> Mapping[str, tuple[str, list[int]]]:
    """variant -> (budget hyperparameter, values), for every registered variant with a budget."""
    out = {}
    for name in registry.list_variants():
        b = registry.get_spec(name).budget
        if b is not None:
            out[name] = (b.knob, list(b.values))
    return MappingProxyType(out)


def length_like_knobs() -> frozenset[str]:
    """The budget knobs that count tokens (their values above N are dropped)."""
    specs = (registry.get_spec(n) for n in registry.list_variants())
    return frozenset(s.budget.knob for s in specs if s.budget is not None and s.budget.length_like)


def pattern_settings() -> Mapping[str, dict]:
    """variant -> the hyperparameters of its N = 64 pattern picture (registered ones only)."""
    specs = {n: registry.get_spec(n) for n in registry.list_variants()}
    return MappingProxyType({n: dict(s.pattern_setting) for n, s in specs.items() if s.pattern_setting})


def learned() -> frozenset[str]:
    """The variants holding learned parameters: untrained here, their rows measure an initialisation."""
    return frozenset(n for n in registry.list_variants() if registry.has_parameters(n))


def thin(values: list, k: int | None) -> list:
    """At most ``k`` of ``values``, evenly spread, the first and the last kept."""
    if k is None or len(values) <= k:
        return list(values)
    idx = sorted(set(int(round(i)) for i in np.linspace(0, len(values) - 1, k)))
    return [values[i] for i in idx]


def budget_of(variant: str, n: int, budget_points: int | None = None) -> tuple[str | None, list, str]:
    """(hyperparameter, values, note) of ``variant`` at length ``n``; (None, [None], note) = defaults."""
    spec = registry.get_spec(variant)
    if spec.budget is None:
        return None, [None], ""
    hp = spec.budget.knob
    defaults = spec.defaults()
    if hp not in defaults:  # a spec made by hand; ``register`` refuses such a knob
        return None, [None], f"budget {hp!r} is not a hyperparameter of {variant} ({', '.join(defaults) or 'none'})"
    values = [v for v in spec.budget.values if not (spec.budget.length_like and v > n)]
    return hp, thin(values, budget_points), ""


def _refusal(caps: Capabilities, input_kind: str, causal: bool) -> str:
    """Why a variant with ``caps`` has no unit on this input and masking ("" when it has)."""
    if causal and not caps.causal:
        return "no causal mode (capabilities.causal=False)"
    if not causal and not caps.bidirectional:
        return "no bidirectional mode (capabilities.bidirectional=False)"
    if input_kind == "trained" and not caps.kv_mask:
        return "the trained model's inputs are padded; variant has no kv_mask"
    return ""


def plan_units(cfg: ApproxConfig, variants: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """Every (input, variant, value, causal) to measure, and the skipped ones with reasons."""
    units, skipped = [], []
    inputs = [("gauss", s) for s in cfg.q_scales]
    if cfg.trained is not None:
        inputs.append(("trained", None))
    for variant in variants:
        caps = registry.get_spec(variant).capabilities
        for input_kind, scale in inputs:
            hp, values, note = budget_of(variant, cfg.seq_len, cfg.budget_points)
            modes = cfg.causal if input_kind == "gauss" else (False,)
            for causal in modes:
                reason = _refusal(caps, input_kind, causal)
                if reason:
                    skip = {"variant": variant, "input": input_kind, "causal": causal, "reason": reason}
                    if skip not in skipped:  # one note per input kind, not one per q scale
                        skipped.append(skip)
                    continue
                for value in values:
                    units.append({"variant": variant, "input": input_kind, "q_scale": scale, "causal": causal,
                                  "hyperparameter": hp, "value": value, "budget_note": note})
    return units, skipped


def _where(cfg: ApproxConfig, input_kind: str) -> str:
    where = f"{cfg.seq_len}x{cfg.batch}h{cfg.num_heads}d{cfg.head_dim}"
    if input_kind == "trained":
        t = cfg.trained
        where += f"-trained-{t.task}-l{t.layer}of{t.num_layers}-s{t.steps}-n{t.num_train}-m{t.mlp_dim}"
    return where


def unit_key(cfg: ApproxConfig, u: dict) -> str:
    """The RowStore key of a unit: its shape, input, variant, setting, masking and seeds."""
    return report.RowStore.make_key(_where(cfg, u["input"]), u["variant"], u["hyperparameter"], u["value"],
                                    u["causal"], u["q_scale"], ",".join(map(str, cfg.seeds)))


def skip_key(cfg: ApproxConfig, s: dict) -> str:
    """The RowStore key of a skipped (variant, input, masking): stored so that a report-only run
    knows which variants the measuring run was given, those with nothing to measure included."""
    return report.RowStore.make_key("skipped", _where(cfg, s["input"]), s["variant"], s["input"], s["causal"])
