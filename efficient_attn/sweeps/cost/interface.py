"""The interface part of the cost experiment: what grouped-query heads and packed batches cost.

Two kinds of rows in the cost RowStore, for the registry's exact baselines that have the
capability (``analysis.baselines``: the quadratic reference and its fast twin), bidirectional,
at the sweep's lengths within ``InterfaceConfig``'s range:

- "gqa": ``heads`` query heads against each of ``kv_heads`` key/value heads, so the table
  can show what fewer kv heads save in time and in compiled temporary memory;
- "packing": the same N tokens as one packed row (sorted segment ids) and as a padded batch
  (one row per sequence, as long as the longest, with kv_mask / q_mask). A tile-skipping
  engine should approach the ideal sum(l_i^2) / N^2 of the dense cost when packed; a dense
  engine pays N^2 for the packed row whatever the ids say, which is the point of showing both;
- "packing_equal": the same for k equal sequences of N / k (``equal_segments``), whose ideal
  is 1/k: sequences aligned with the engine's tiles show what the tile skipping itself costs.

Each point is timed and measured the way ``point.py`` does it (compile apart, warm-up,
``block_until_ready``, medians; ``measure.compiled_memory``); a point over a budget is stored
as skipped with the reason, an exception as an error row, and a rerun resumes.
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import efficient_attn as ea
from efficient_attn import measure, report
from efficient_attn.core import Mask
from efficient_attn.sweeps.cost.analysis import baselines
from efficient_attn.sweeps.cost.budgets import Budgets, claimed, is_done, point_budget
from efficient_attn.sweeps.cost.config import INTERFACE_KINDS, LAYOUTS, PACKING_KINDS, CostConfig
from efficient_attn.sweeps.cost.point import record_error, record_memory, record_timing, skip_over_time_budget
from efficient_attn.sweeps.cost.progress import progress_bar

__all__ = ["KINDS", "PACKING_KINDS", "Point", "lengths", "variants_for", "segment_lengths", "points", "row_key",
           "pending", "measure_interface_point", "run_interface"]

KINDS = INTERFACE_KINDS


class Point(NamedTuple):
    """One interface point. ``setting`` is the number of kv heads ("gqa") or the layout (the packing kinds)."""

    kind: str
    variant: str
    pass_: str
    n: int
    setting: int | str


def lengths(cfg: CostConfig) -> list[int]:
    """The sweep's lengths within the interface's range, increasing."""
    i = cfg.interface
    return sorted(n for n in set(cfg.lengths) if i.min_length <= n <= i.max_length)


def variants_for(kind: str, variants: Sequence[str]) -> list[str]:
    """The baselines among ``variants`` whose capabilities cover ``kind`` (gqa / segments)."""
    flag = "gqa" if kind == "gqa" else "segments"  # the packing kinds
    return [b for b in baselines() if b in variants and getattr(ea.get_spec(b).capabilities, flag)]


def segment_lengths(n: int, cfg: CostConfig) -> list[int]:
    """Seeded sequence lengths in [lo * n, hi * n] (``segment_range``) that sum to ``n``.

    The count k is drawn uniformly among those the bounds allow; each sequence starts at the
    shortest length and the rest of the tokens are spread by Dirichlet weights, capped at the
    longest length (what rounding leaves goes one token at a time to sequences with room).
    """
    lo_f, hi_f = cfg.interface.segment_range
    lo = max(1, math.ceil(lo_f * n))
    hi = max(lo, math.floor(hi_f * n))
    k_min, k_max = math.ceil(n / hi), n // lo
    if k_min > k_max:
        raise ValueError(f"cost/interface: no count of sequences in [{lo}, {hi}] sums to N={n}; "
                         "widen segment_range")
    rng = np.random.default_rng([cfg.seed, n])
    k = int(rng.integers(k_min, k_max + 1))
    room = hi - lo
    extra = n - k * lo
    add = np.minimum(np.floor(rng.dirichlet(np.ones(k)) * extra).astype(int), room)
    order = rng.permutation(k)
    i = 0
    while add.sum() < extra:  # terminates: k * room >= extra because k >= n / hi
        j = order[i % k]
        if add[j] < room:
            add[j] += 1
        i += 1
    return [int(lo + a) for a in add]


def points(cfg: CostConfig, variants: Sequence[str]) -> list[Point]:
    """Every interface point of ``cfg``, by length, then pass, gqa before packing: a run cut
    short by its budget leaves whole groups (every kv count, both layouts) at the shorter lengths."""
    if not cfg.interface.enabled:
        return []
    out = []
    gqa, packing = variants_for("gqa", variants), variants_for("packing", variants)
    for n in lengths(cfg):
        for pass_ in cfg.passes:
            out += [Point("gqa", v, pass_, n, g) for v in gqa for g in dict.fromkeys(cfg.interface.kv_heads)]
            out += [Point("packing", v, pass_, n, layout) for v in packing for layout in LAYOUTS]
            if cfg.interface.equal_segments is not None:
                out += [Point("packing_equal", v, pass_, n, layout) for v in packing for layout in LAYOUTS]
    return out


def row_key(p: Point, cfg: CostConfig) -> str:
    i = cfg.interface
    if p.kind == "gqa":
        return report.RowStore.make_key("gqa", p.variant, p.pass_, "bidir", p.n, cfg.batch, i.heads, p.setting,
                                        cfg.head_dim, cfg.dtype)
    if p.kind == "packing_equal":
        return report.RowStore.make_key("packing_equal", p.variant, p.pass_, p.setting, p.n, i.heads, cfg.head_dim,
                                        cfg.dtype, f"k={i.equal_segments}")
    lo, hi = i.segment_range
    return report.RowStore.make_key("packing", p.variant, p.pass_, p.setting, p.n, i.heads, cfg.head_dim,
                                    cfg.dtype, cfg.seed, f"{lo:g}-{hi:g}")


def pending(cfg: CostConfig, variants: Sequence[str], store: report.RowStore) -> int:
    """How many interface points a run would measure."""
    budget = point_budget(cfg)
    return sum(not is_done(store.get(row_key(p, cfg)), budget) for p in points(cfg, variants))


# ----------------------------------------------------------------------------- one point


def _layout(p: Point, cfg: CostConfig) -> dict[str, Any]:
    """The shape of a point: batch, rows' length, kv heads, and for packing the sequences."""
    i = cfg.interface
    if p.kind == "gqa":
        return {"batch": cfg.batch, "seq_len": p.n, "num_kv_heads": p.setting}
    packed = p.setting == "packed"
    if p.kind == "packing_equal":
        k = i.equal_segments
        if p.n % k:
            raise ValueError(f"cost/interface: N={p.n} does not split into {k} equal sequences; "
                             "choose lengths divisible by equal_segments")
        lens = [p.n // k] * k
        described = {"equal_segments": k}
    else:
        lens = segment_lengths(p.n, cfg)
        described = {"segment_range": list(i.segment_range), "seed": cfg.seed}
    return {"batch": 1 if packed else len(lens), "seq_len": p.n if packed else max(lens), "num_kv_heads": i.heads,
            "segment_lengths": lens, **described}


def base_row(p: Point, cfg: CostConfig) -> dict[str, Any]:
    """The row of a point before it is measured: what it is, under which budgets, no figures."""
    spec = ea.get_spec(p.variant)
    row = {"kind": p.kind, "variant": p.variant, "n": p.n, "pass": p.pass_, "causal": False,
           "layout": p.setting if p.kind in PACKING_KINDS else None, "status": "ok", "reason": "",
           "family": spec.family, "exact": spec.capabilities.exact, "claimed_time": spec.capabilities.time,
           "claimed_memory": spec.capabilities.memory, "heads": cfg.interface.heads, "head_dim": cfg.head_dim,
           "dtype": cfg.dtype}
    try:
        row.update(_layout(p, cfg))
    except ValueError as err:  # segment lengths the range cannot give
        row.update(status="error", reason=str(err))
    row.update(time_median_s=None, time_spread=None, time_spread_kind=None, time_min_s=None, time_max_s=None,
               repeats=0, compile_s=None, memory_bytes=None, temp_bytes=None, argument_bytes=None,
               output_bytes=None, xla_peak_bytes=None, **point_budget(cfg))
    return row


def _inputs(p: Point, cfg: CostConfig, shape: dict) -> tuple[Any, ...]:
    """q, k, v, the output cotangent g and the Mask of a point (numpy draws, as in ``point.py``).

    Packed and padded hold the same tokens: the padded batch puts sequence i's tokens at the
    start of row i, zeros after (masked, so their values do not matter)."""
    i = cfg.interface
    dtype = jnp.dtype(cfg.dtype)
    rng = np.random.default_rng(cfg.seed)
    d = cfg.head_dim
    if p.kind == "gqa":
        b, n, g = cfg.batch, p.n, p.setting
        q, o = (rng.standard_normal((b, n, i.heads, d), dtype=np.float32) for _ in range(2))
        k, v = (rng.standard_normal((b, n, g, d), dtype=np.float32) for _ in range(2))
        return (*(jnp.asarray(x, dtype) for x in (q, k, v, o)), Mask())
    lens = shape["segment_lengths"]
    q, k, v, o = (rng.standard_normal((1, p.n, i.heads, d), dtype=np.float32) for _ in range(4))
    if p.setting == "packed":
        ids = jnp.asarray(np.repeat(np.arange(len(lens)), lens)[None], jnp.int32)
        return (*(jnp.asarray(x, dtype) for x in (q, k, v, o)), Mask(q_segment_ids=ids, kv_segment_ids=ids))
    rows, width = len(lens), max(lens)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    present = np.arange(width)[None, :] < np.asarray(lens)[:, None]  # [rows, width]
    where = (starts[:, None] + np.arange(width)[None, :])[present]  # packed position of each real token

    def pad(x):
        out = np.zeros((rows, width) + x.shape[2:], np.float32)
        out[present] = x[0, where]
        return jnp.asarray(out, dtype)

    real = jnp.asarray(present)
    return (*(pad(x) for x in (q, k, v, o)), Mask(kv_mask=real, q_mask=real))


def point_function(p: Point, cfg: CostConfig, shape: dict):
    """(fn, args): "fwd" is the attention call, "fwd_bwd" the gradient of <out, g> with respect
    to the variant's parameters and q, k, v; the Mask is an argument (a batch's ids are data)."""
    module = ea.build(p.variant, num_heads=cfg.interface.heads, head_dim=cfg.head_dim, max_len=shape["seq_len"],
                      num_kv_heads=shape["num_kv_heads"], rngs=nnx.Rngs(cfg.seed))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    q, k, v, g, mask = _inputs(p, cfg, shape)

    def forward(params, rest, q, k, v, mask):
        return nnx.merge(graphdef, params, rest)(q, k, v, mask=mask)

    if p.pass_ == "fwd":
        return forward, (params, rest, q, k, v, mask)

    def loss(params, q, k, v, rest, mask, g):
        out = forward(params, rest, q, k, v, mask)
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2, 3)), (params, q, k, v, rest, mask, g)


def measure_interface_point(p: Point, cfg: CostConfig, *, predicted_s: tuple[float, float] | None = None,
                            from_n: int | None = None) -> dict[str, Any]:
    """Time and compiled memory of one interface point; never raises for a variant's failure."""
    row = base_row(p, cfg)
    if row["status"] == "error":
        return row
    if skip_over_time_budget(row, predicted_s, from_n, cfg.max_call_s):
        return row
    try:
        fn, args = point_function(p, cfg, row)
        compiled, compile_s = measure.compile_function(fn, *args)
        row["compile_s"] = compile_s
        if record_memory(row, compiled, cfg.memory_budget_bytes, "compiled program"):
            return row
        timing = measure.time_compiled(compiled, *args, warmup=cfg.warmup, min_repeats=cfg.min_repeats,
                                       max_repeats=cfg.max_repeats, budget_s=cfg.repeat_budget_s,
                                       compile_s=compile_s)
        record_timing(row, timing)
    except Exception as err:  # noqa: BLE001 - one point's failure must not stop the sweep
        record_error(row, err)
    return row


def run_interface(cfg: CostConfig, variants: Sequence[str], store: report.RowStore, *, force: bool = False,
                  progress: bool = True) -> None:
    """Measure every interface point of ``cfg`` not already in ``store``."""
    todo = points(cfg, variants)
    budget = point_budget(cfg)
    budgets = Budgets(cfg.max_compile_s)
    bar = progress_bar(len(todo), progress, "interface")
    t_start = time.perf_counter()
    last_n = None
    try:
        for p in todo:
            series = (p.kind, p.variant, p.pass_, p.setting)
            key = row_key(p, cfg)
            bar.set_postfix_str(f"{p.kind} {p.variant} N={p.n} {p.pass_} {p.setting}")
            prev = store.get(key)
            if not force and is_done(prev, budget):
                budgets.remember(prev, series, "time_median_s")
                bar.update(1)
                continue
            if p.n != last_n:  # drop the compiled programs of the shorter length
                jax.clear_caches()
                last_n = p.n
            reason = budgets.skip_reason(series, p.n, t_start, cfg.interface.budget_s)
            if reason is not None:
                row = base_row(p, cfg)
                if row["status"] != "error":
                    row.update(status="skipped", reason=reason)
            else:
                predicted, from_n = budgets.predict(series, p.n, claimed(ea.get_spec(p.variant), "time"))
                row = measure_interface_point(p, cfg, predicted_s=predicted, from_n=from_n)
            store.add(key, row)
            budgets.remember(row, series, "time_median_s")
            bar.update(1)
    finally:
        bar.close()
