"""The cost experiment's analysis of stored rows: series, log-log slopes, crossovers, baselines.

Nothing here measures. The baselines every variant is compared with come from the registry
(``baselines``): the exact variants whose claimed memory is quadratic (the naive reference,
``full``), each followed by the fast exact twin its spec names (``fast_exact``:
``blockwise``, exact with O(N) memory). LRA's Table 2 (Tay et al. 2020, arXiv 2011.04006)
compared against the naive Transformer only; the second baseline moves the crossovers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import efficient_attn as ea
from efficient_attn import measure

if TYPE_CHECKING:
    from efficient_attn.sweeps.cost.config import CostConfig

__all__ = ["baselines", "quadratic_reference", "analyse"]


def _memory_exponent(spec) -> float | None:
    try:
        return measure.parse_big_o(spec.capabilities.memory).exponent
    except ValueError:
        return None


def baselines() -> tuple[str, ...]:
    """The registered exact references: each exact variant with quadratic claimed memory, then
    the fast exact twin its spec names. Those declaring a twin come first (the registry's
    ground truth, ``full``), so the first entry is the quadratic reference of Table 2."""
    specs = {name: ea.get_spec(name) for name in ea.list_variants()}
    quadratic = [n for n, s in specs.items() if s.capabilities.exact and (_memory_exponent(s) or 0) >= 2]
    quadratic.sort(key=lambda n: (specs[n].fast_exact is None, n))
    out: list[str] = []
    for name in quadratic:
        for b in (name, specs[name].fast_exact):
            if b and b not in out:
                out.append(b)
    return tuple(out)


def quadratic_reference() -> str | None:
    """The first baseline: the naive quadratic Transformer's attention (``full``)."""
    bases = baselines()
    return bases[0] if bases else None


def order_key(bases: Sequence[str]):
    """Sort key: the baselines first, in their order, then the rest alphabetically."""
    bases = tuple(bases)
    return lambda v: (bases.index(v) if v in bases else len(bases), v)


def current(rows: Sequence[dict], cfg: CostConfig, kind: str = "cost") -> list[dict]:
    """The rows of ``kind`` measured at ``cfg``'s shape and dtype."""
    dims = (cfg.batch, cfg.heads, cfg.head_dim, cfg.dtype)
    return [r for r in rows if r.get("kind", "cost") == kind
            and (r.get("batch"), r.get("heads"), r.get("head_dim"), r.get("dtype")) == dims]


def series(rows: Sequence[dict]) -> dict[tuple[str, bool], dict[str, dict[int, dict]]]:
    """(pass, causal) -> variant -> n -> row."""
    out: dict[tuple[str, bool], dict[str, dict[int, dict]]] = {}
    for r in rows:
        out.setdefault((r["pass"], bool(r["causal"])), {}).setdefault(r["variant"], {})[int(r["n"])] = r
    return out


def ok(r: dict | None, field: str) -> float | None:
    """``r[field]`` as a positive float when ``r`` was measured, else None."""
    if r is None or r.get("status") != "ok":
        return None
    v = r.get(field)
    return float(v) if v is not None and v > 0 else None


def analyse(rows: Sequence[dict],
            bases: Sequence[str] | None = None) -> dict[tuple[str, bool], dict[str, dict[str, Any]]]:
    """Per (pass, causal) and variant: slopes (all points and the 3 longest), claimed slopes,
    and crossovers against each of ``bases`` (default: ``baselines()``)."""
    bases = baselines() if bases is None else tuple(bases)
    result: dict[tuple[str, bool], dict[str, dict[str, Any]]] = {}
    for group, by_variant in series(rows).items():
        res = result.setdefault(group, {})
        for name, by_n in by_variant.items():
            ns = sorted(by_n)
            info: dict[str, Any] = {"ns": ns}
            for field, which in (("time_median_s", "time"), ("memory_bytes", "memory")):
                pts = [(n, ok(by_n[n], field)) for n in ns if ok(by_n[n], field)]
                info[f"{which}_fit"] = measure.fit_loglog([p[0] for p in pts], [p[1] for p in pts])
                info[f"{which}_tail_fit"] = measure.fit_loglog([p[0] for p in pts[-3:]], [p[1] for p in pts[-3:]])
                claim = by_n[ns[0]].get(f"claimed_{which}")
                try:
                    c = measure.parse_big_o(claim)
                    mid = math.sqrt(pts[0][0] * pts[-1][0]) if pts else ns[0]
                    info[f"{which}_claimed"] = c.slope_at(mid)
                except (ValueError, TypeError):
                    info[f"{which}_claimed"] = None
                info[f"{which}_claim_text"] = claim
            for base in bases:
                b = by_variant.get(base)
                if b is None or base == name:
                    continue
                common = [n for n in ns if n in b]
                vt = [ok(by_n[n], "time_median_s") for n in common]
                bt = [ok(b[n], "time_median_s") for n in common]
                vm = [ok(by_n[n], "memory_bytes") for n in common]
                bm = [ok(b[n], "memory_bytes") for n in common]
                info[f"cross_time_{base}"] = measure.crossover(common, vt, bt)
                info[f"cross_memory_{base}"] = measure.crossover(common, vm, bm)
                info[f"cross_both_{base}"] = measure.crossover(common, vt, bt, variant_extra=vm, baseline_extra=bm)
                # lengths where the baseline could not run (over budget) but the variant could
                info[f"beyond_{base}"] = [n for n in ns if ok(by_n[n], "time_median_s") and n in b
                                          and b[n].get("status") == "skipped"
                                          and not str(b[n].get("reason", "")).startswith("sweep budget")]
            res[name] = info
    return result
