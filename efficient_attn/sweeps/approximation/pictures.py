"""patterns.png: each variant's implied weights for one structured input at a small N, beside
the exact reference's, bidirectional and causal; the matrices are cached in patterns.npz."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from efficient_attn import patterns, registry
from efficient_attn.core import Mask
from efficient_attn.sweeps.approximation.config import ApproxConfig

__all__ = ["pattern_setting", "pattern_panels"]

MODES = ("bidirectional", "causal")


def pattern_setting(variant: str) -> dict:
    """The registered hyperparameters of ``variant``'s picture: budgets scaled down to N = 64,
    where at their defaults several variants would cover the whole sequence and copy full."""
    spec = registry.get_spec(variant)
    defaults = spec.defaults()
    return {k: v for k, v in spec.pattern_setting.items() if k in defaults}


def _label(variant: str) -> str:
    label = ",".join(f"{a}={b}" for a, b in pattern_setting(variant).items())
    if registry.get_spec(variant).capabilities.shared_qk:
        label = ", ".join(x for x in (label, "shared QK") if x)
    return label


def pattern_panels(cfg: ApproxConfig, variants: Sequence[str], cache_path: Path, force: bool, log, *,
                   compute: bool = True) -> dict:
    """{variant: {mode: [T, S] matrix or the reason there is none, "label": ...}} at
    ``cfg.pattern_len``, the reference first, cached in an npz.

    ``compute=False`` takes matrices from the cache only (a missing one says so).
    """
    n = cfg.pattern_len
    cached: dict[str, np.ndarray] = {}
    if cache_path.exists() and not force:
        with np.load(cache_path) as z:
            cached = {k: z[k] for k in z.files}
    q, k = patterns.structured_qk(n, cfg.num_heads, cfg.head_dim)
    v = jnp.zeros_like(q)
    reference = registry.exact_reference()
    panels: dict[str, dict] = {}
    added = False
    for variant in [reference] + [x for x in variants if x != reference]:
        caps = registry.get_spec(variant).capabilities
        panels[variant] = {}
        setting = ",".join(f"{a}={b}" for a, b in pattern_setting(variant).items())
        for mode in MODES:
            key = f"{variant}|{setting}|{mode}|{n}"
            if mode == "causal" and not caps.causal:
                panels[variant][mode] = "no causal mode"
                continue
            if mode == "bidirectional" and not caps.bidirectional:
                panels[variant][mode] = "no bidirectional mode"
                continue
            if key not in cached:
                if not compute:
                    panels[variant][mode] = "not in patterns.npz"
                    continue
                try:
                    module = registry.build(variant, num_heads=cfg.num_heads, head_dim=cfg.head_dim, max_len=n,
                                            **pattern_setting(variant))
                    a, _ = patterns.probe(module, q, k, v, Mask(causal=mode == "causal"),
                                          fast_compile=cfg.fast_compile)
                    cached[key] = a[0, 0]
                    added = True
                except Exception as err:  # noqa: BLE001  (a picture must not stop the sweep)
                    log(f"  patterns: {variant} {mode} failed: {type(err).__name__}: {err}")
                    panels[variant][mode] = f"error: {type(err).__name__}"
                    continue
            panels[variant][mode] = cached[key]
        label = _label(variant)
        if label:
            panels[variant]["label"] = label
    if added:  # unchanged caches are left as they are
        tmp = cache_path.with_name(f".{cache_path.stem}.tmp.npz")
        np.savez_compressed(tmp, **cached)
        tmp.replace(cache_path)
    return panels
