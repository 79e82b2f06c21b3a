"""One unit of the approximation sweep: a variant at one budget value against the exact
reference on the same inputs, over seeds.

    relative output error   ||out - out_ref|| / ||out_ref||     (real queries only)
    row KL                  mean over rows of KL(A_ref || A_variant), in nats

where A is the attention matrix a variant implies, found by probing it with one-hot values
(``efficient_attn.patterns``). KL is reported only where A is a distribution; otherwise the
mean negative mass per row.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_attn import patterns, registry
from efficient_attn.core import Mask
from efficient_attn.sweeps.approximation.config import ApproxConfig
from efficient_attn.sweeps.approximation.inputs import gaussian, shared_qk

__all__ = ["metrics", "measure_unit"]


def metrics(a, o, a_ref, o_ref, v, q_valid) -> dict:
    """Errors of one (variant, input): rows restricted to real queries (q_valid [B, T])."""
    qv = np.asarray(q_valid, bool)
    rows = qv[:, None, :]  # [B, 1, T]
    diff = (o - o_ref)[qv]
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(o_ref[qv]), 1e-30))
    a_r = np.where(rows[..., None], a_ref, 0.0)  # invisible rows drop out of KL and masses
    a_m = np.where(rows[..., None], a, 0.0)
    dist = patterns.is_distribution(a_m, a_r)
    return {
        "rel_err": rel,
        "kl": patterns.row_kl(a_r, a_m) if dist else None,
        "distribution": dist,
        "neg_mass": patterns.negative_mass(a_m, a_r),
        "consistency": patterns.probe_consistency(jnp.asarray(a), v, o),
    }


def _mean_std(xs: list) -> tuple[float | None, float | None]:
    vals = [x for x in xs if x is not None]
    if not vals or len(vals) != len(xs):
        return None, None
    return float(np.mean(vals)), float(np.std(vals))


def measure_unit(cfg: ApproxConfig, u: dict, reference_cache: dict, trained: dict | None) -> dict:
    """The row of unit ``u``: mean and std over ``cfg.seeds`` of the errors against the reference.

    ``reference_cache`` keeps the reference's probe per input, shared by every unit.
    """
    spec = registry.get_spec(u["variant"])
    reference = registry.exact_reference()
    per_seed = []
    for seed in cfg.seeds:
        n, H, D = cfg.seq_len, cfg.num_heads, cfg.head_dim
        if u["input"] == "gauss":
            q, k, v = gaussian(cfg, seed, u["q_scale"])
            # an all-True key mask where the variant takes one: the same pytree as the trained
            # input's, so both inputs run one compiled function (the values are unchanged)
            everything = jnp.ones(q.shape[:2], bool) if spec.capabilities.kv_mask else None
            mask = Mask(causal=u["causal"], kv_mask=everything)
            q_valid = np.ones(q.shape[:2], bool)
            ref_key = ("gauss", seed, u["q_scale"], u["causal"], everything is None)
        else:
            q, k, v, mask = trained["q"], trained["k"], trained["v"], trained["mask"]
            q_valid = np.asarray(mask.kv_mask)
            ref_key = ("trained",)
        ref_mask = mask
        if spec.capabilities.shared_qk:
            k, ref_mask = shared_qk(q, mask)
            ref_key += ("shared-qk",)
        if ref_key not in reference_cache:
            exact = registry.build(reference, num_heads=H, head_dim=D, max_len=n)
            reference_cache[ref_key] = patterns.probe(exact, q, k, v, ref_mask, fast_compile=cfg.fast_compile)
        a_ref, o_ref = reference_cache[ref_key]
        hp = {u["hyperparameter"]: u["value"]} if u["hyperparameter"] else {}
        module = registry.build(u["variant"], num_heads=H, head_dim=D, max_len=n, rngs=nnx.Rngs(seed), **hp)
        a, o = patterns.probe(module, q, k, v, mask, fast_compile=cfg.fast_compile)
        per_seed.append(metrics(a, o, a_ref, o_ref, v, q_valid))
    row = {k: u[k] for k in ("input", "variant", "hyperparameter", "value", "causal", "q_scale")}
    row["seq_len"] = int(q.shape[1])
    for m in ("rel_err", "kl", "neg_mass"):
        row[m], row[m + "_std"] = _mean_std([s[m] for s in per_seed])
    row["distribution"] = all(s["distribution"] for s in per_seed)
    row["consistency"] = max(s["consistency"] for s in per_seed)
    row["seeds"] = len(per_seed)
    row["status"] = "ok"
    return row
