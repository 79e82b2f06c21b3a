"""The cost experiment: time, memory and FLOPs of every registered variant against the length N.

For each variant, pass ("fwd": the attention call; "fwd_bwd": the gradient of <out, g> with
respect to q, k, v and the variant's parameters), masking (bidirectional, and causal where the
variant's capabilities allow it) and length N, one point measures (``efficient_attn.measure``):

- time: compiled once (``compile_s`` apart), warm-up, then the median and interquartile range
  of timed repeats, each inside ``jax.block_until_ready``; an adaptive repeat count;
- memory: ``compiled.memory_analysis()`` argument + output + temporary bytes (``memory_bytes``;
  ``temp_bytes`` apart) and, where the backend keeps one, the device's peak (``device_peak_bytes``);
- FLOPs: XLA's ``cost_analysis`` for loop-free programs, else a count on the jaxpr
  (``flops_source`` says which), and the fraction of this machine's matmul rate, measured in
  the same run (f32 2048^3).

Then per variant: log-log slopes of time and memory against N beside the slopes its
capabilities claim, speed-up and memory ratio against ``full`` (the naive quadratic baseline)
and against ``blockwise`` (exact, O(N) memory), and the crossover length against each.
LRA's Table 2 (Tay et al. 2020, "Long Range Arena", arXiv 2011.04006) compared against the
naive Transformer only; the second baseline moves the crossovers, and the table shows both.

A point whose predicted time per call (extrapolated from the previous length) or whose compiled
memory exceeds the preset's budget is recorded as skipped with the reason; an exception is
recorded as an error; neither stops the sweep. Every finished point is appended to a
``RowStore`` as it completes, so a rerun resumes (``--force`` starts over), and the tables are
rebuilt from the store at the end and on Ctrl-C.

The LRA Table 2 analog (``run_table2``, at the end of this file): training steps per second
and compiled memory of LRA's byte-level text classifier (``nn.Classifier``, scaled down by the
preset) at 1K-4K tokens for every variant, relative to ``full``, beside the published numbers.

Run: ``python experiments/cost_scaling.py --preset quick`` or ``efficient-attn bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import efficient_attn as ea
from efficient_attn import measure, report
from efficient_attn.core import Mask, check_config, check_positive_int
from efficient_attn.registry import load_plugin

__all__ = ["CostConfig", "Table2Config", "PRESETS", "run", "write_outputs", "main"]

PASSES = ("fwd", "fwd_bwd")
BASELINES = ("full", "blockwise")
GiB = 1024**3
MiB = 1024**2


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Table2Config:
    """The LRA Table 2 analog: the byte-level text classifier, trained, at lengths 1K-4K.

    LRA's text configuration is 4 layers, width 256, 4 heads, MLP 1024, batch 32 (reference
    table); presets scale it down with these fields. ``step_budget_s`` bounds the timed steps
    of one point, ``max_step_s`` skips a length whose predicted step time exceeds it.
    """

    enabled: bool = True
    lengths: tuple[int, ...] = (1024, 2048, 3072, 4096)  # visited in this order (tables sort them)
    batch: int = 32
    num_layers: int = 4
    emb_dim: int = 256
    num_heads: int = 4
    mlp_dim: int = 1024
    warmup: int = 1
    min_repeats: int = 2
    max_repeats: int = 10
    step_budget_s: float = 2.0
    max_step_s: float = 10.0
    memory_budget_bytes: int = 64 * GiB
    budget_s: float | None = None  # after this many seconds of Table 2 work, the rest is skipped

    def __post_init__(self):
        for f in ("batch", "num_layers", "emb_dim", "num_heads", "mlp_dim", "min_repeats", "max_repeats"):
            check_positive_int("cost/table2", f, getattr(self, f))
        check_config("cost/table2", all(isinstance(n, int) and n > 0 for n in self.lengths),
                     f"lengths must be positive ints, got {self.lengths!r}")
        check_config("cost/table2", self.emb_dim % self.num_heads == 0,
                     f"emb_dim={self.emb_dim} must be divisible by num_heads={self.num_heads}")


@dataclasses.dataclass(frozen=True)
class CostConfig:
    """One cost sweep. Points are visited mode by mode (forward bidirectional, forward+backward
    bidirectional, then the causal ones), each mode in increasing length with every variant at
    one length before the next; a sweep stopped by ``sweep_budget_s`` therefore has complete
    curves, for every variant, in the modes it reached.

    variants:            names (None = every registered variant, plugins included)
    lengths:             sequence lengths N (T = S = N)
    passes:              subset of ("fwd", "fwd_bwd")
    causal_modes:        subset of (False, True); causal only where the variant supports it
    batch/heads/head_dim/dtype: the q, k, v shape [batch, N, heads, head_dim] and dtype
    warmup, min_repeats, max_repeats, repeat_budget_s: the timing protocol of one point
    max_call_s:          skip a point whose predicted time per call exceeds this (seconds)
    max_compile_s:       skip the longer lengths of a series once one compile took longer than this
    memory_budget_bytes: skip a point whose compiled memory exceeds this
    sweep_budget_s:      after this many seconds, the remaining points are skipped (None = no limit)
    """

    preset: str = "quick"
    variants: tuple[str, ...] | None = None
    lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    passes: tuple[str, ...] = PASSES
    causal_modes: tuple[bool, ...] = (False, True)
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    warmup: int = 1
    min_repeats: int = 2
    max_repeats: int = 10
    repeat_budget_s: float = 1.0
    max_call_s: float = 3.0
    max_compile_s: float = 60.0
    memory_budget_bytes: int = 4 * GiB
    sweep_budget_s: float | None = None
    seed: int = 0
    matmul_n: int = 2048
    table2: Table2Config = Table2Config()

    def __post_init__(self):
        for f in ("batch", "heads", "head_dim", "min_repeats", "max_repeats", "matmul_n"):
            check_positive_int("cost", f, getattr(self, f))
        check_config("cost", self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        check_config("cost", self.max_repeats >= self.min_repeats,
                     f"max_repeats={self.max_repeats} must be >= min_repeats={self.min_repeats}")
        check_config("cost", len(self.lengths) > 0 and all(isinstance(n, int) and n > 0 for n in self.lengths),
                     f"lengths must be positive ints, got {self.lengths!r}")
        check_config("cost", set(self.passes) <= set(PASSES) and self.passes,
                     f"passes must be a non-empty subset of {PASSES}, got {self.passes!r}")
        check_config("cost", set(self.causal_modes) <= {False, True} and self.causal_modes,
                     f"causal_modes must be a non-empty subset of (False, True), got {self.causal_modes!r}")
        check_config("cost", self.dtype in ("float32", "bfloat16", "float16"),
                     f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        check_config("cost", self.max_call_s > 0 and self.repeat_budget_s >= 0,
                     f"max_call_s must be > 0 and repeat_budget_s >= 0, got {self.max_call_s}, {self.repeat_budget_s}")


PRESETS: dict[str, CostConfig] = {
    # CPU, minutes: every variant, N = 256, 1024, 4096 (three lengths a factor 4 apart: enough
    # for the slopes and the crossovers; compiling a program takes 0.3-2 s on 2 cores and is
    # most of the run), one warm-up and 1-5 timed calls within 0.25 s, no call predicted over
    # 3 s. Table 2 scaled down to one layer of width 64 at batch 1, at 1K and 4K (the ends of
    # LRA's range). Deadlines are a safety net (a slower machine): what is not reached is
    # recorded as skipped and a rerun resumes it.
    "quick": CostConfig(
        preset="quick",
        lengths=(256, 1024, 4096),
        min_repeats=1,
        max_repeats=5,
        repeat_budget_s=0.25,
        max_call_s=3.0,
        max_compile_s=15.0,
        memory_budget_bytes=3 * GiB,
        sweep_budget_s=125.0,
        table2=Table2Config(lengths=(1024, 4096), batch=1, num_layers=1, emb_dim=64, num_heads=2,
                            mlp_dim=128, min_repeats=1, max_repeats=3, step_budget_s=0.3, max_step_s=5.0,
                            memory_budget_bytes=3 * GiB, budget_s=40.0),
    ),
    # CPU, hours: N up to 65536 or until a budget; more repeats; Table 2 at half LRA's width.
    "cpu": CostConfig(
        preset="cpu",
        lengths=tuple(2**i for i in range(8, 17)),
        min_repeats=3,
        max_repeats=20,
        repeat_budget_s=5.0,
        max_call_s=60.0,
        max_compile_s=300.0,
        memory_budget_bytes=12 * GiB,
        table2=Table2Config(batch=8, num_layers=2, emb_dim=128, num_heads=4, mlp_dim=512,
                            min_repeats=3, max_repeats=10, step_budget_s=5.0, max_step_s=60.0,
                            memory_budget_bytes=12 * GiB),
    ),
    # Accelerator: N up to 65536; Table 2 at LRA's text configuration (4 layers, width 256, 4 heads,
    # MLP 1024, batch 32).
    "lra": CostConfig(
        preset="lra",
        lengths=tuple(2**i for i in range(10, 17)),
        min_repeats=5,
        max_repeats=50,
        repeat_budget_s=3.0,
        max_call_s=30.0,
        max_compile_s=600.0,
        memory_budget_bytes=60 * GiB,
        table2=Table2Config(min_repeats=5, max_repeats=50, step_budget_s=5.0, max_step_s=30.0,
                            memory_budget_bytes=60 * GiB),
    ),
}


# ----------------------------------------------------------------------------- one point


def _claimed(spec, which: str) -> measure.Complexity | None:
    try:
        return measure.parse_big_o(getattr(spec.capabilities, which))
    except ValueError:
        return None


@functools.lru_cache(maxsize=128)
def _module_state(name: str, heads: int, head_dim: int, n: int, seed: int):
    """The variant's (graphdef, params, other state), built once per length for all four modes
    (building some variants takes a second: their fixed random patterns are drawn eagerly)."""
    module = ea.build(name, num_heads=heads, head_dim=head_dim, max_len=n, rngs=nnx.Rngs(seed))
    return nnx.split(module, nnx.Param, ...)


def _point_function(name: str, pass_: str, causal: bool, n: int, cfg: CostConfig):
    """(fn, args): a pure function of (params, other state, q, k, v[, g]) and its arguments."""
    graphdef, params, rest = _module_state(name, cfg.heads, cfg.head_dim, n, cfg.seed)
    mask = Mask(causal=True) if causal else None
    dtype = jnp.dtype(cfg.dtype)
    # numpy draws: jax.random would compile a sampler for every new shape (over a second on CPU)
    rng = np.random.default_rng(cfg.seed)
    shape = (cfg.batch, n, cfg.heads, cfg.head_dim)
    q, k, v, g = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype=dtype) for _ in range(4))

    def forward(params, rest, q, k, v):
        return nnx.merge(graphdef, params, rest)(q, k, v, mask=mask)

    if pass_ == "fwd":
        return forward, (params, rest, q, k, v)

    def loss(params, q, k, v, rest, g):
        out = forward(params, rest, q, k, v)
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2, 3)), (params, q, k, v, rest, g)


def _predict(history: list[tuple[int, float]], n: int, claimed: measure.Complexity | None) -> tuple[float, float] | None:
    """Predicted value at ``n`` from the longest measured lengths below it: (value, exponent used).

    None when nothing shorter was measured. The exponent is the local slope of the last two points, or the claimed one with a single
    point, clipped to [1, 3] (small lengths are overhead-dominated and understate growth).
    """
    below = sorted(p for p in history if p[0] < n)
    if not below:
        return None
    n1, y1 = below[-1]
    if len(below) >= 2 and below[-2][1] > 0 and y1 > 0:
        n0, y0 = below[-2]
        e = math.log(y1 / y0) / math.log(n1 / n0)
    else:
        e = claimed.slope_at(n) if claimed else 2.0
    e = min(max(e, 1.0), 3.0)
    return y1 * (n / n1) ** e, e


def _base_row(name: str, pass_: str, causal: bool, n: int, cfg: CostConfig) -> dict[str, Any]:
    spec = ea.get_spec(name)
    return {
        "variant": name,
        "n": n,
        "pass": pass_,
        "causal": causal,
        "status": "ok",
        "reason": "",
        "family": spec.family,
        "exact": spec.capabilities.exact,
        "claimed_time": spec.capabilities.time,
        "claimed_memory": spec.capabilities.memory,
        "batch": cfg.batch,
        "heads": cfg.heads,
        "head_dim": cfg.head_dim,
        "dtype": cfg.dtype,
        "time_median_s": None,
        "time_spread": None,
        "time_spread_kind": None,
        "time_min_s": None,
        "time_max_s": None,
        "repeats": 0,
        "compile_s": None,
        "memory_bytes": None,
        "temp_bytes": None,
        "argument_bytes": None,
        "output_bytes": None,
        "xla_peak_bytes": None,
        "device_peak_bytes": None,
        "flops": None,
        "flops_source": None,
        "flops_xla": None,
        "flops_jaxpr": None,
        "gflops_per_s": None,
        "matmul_gflops": None,
        "matmul_fraction": None,
        "max_call_s": cfg.max_call_s,
        "max_compile_s": cfg.max_compile_s,
        "memory_budget_bytes": cfg.memory_budget_bytes,
    }


def _record_memory(row: dict, compiled, budget_bytes: int, what: str) -> bool:
    """Put the compiled program's memory into ``row``; mark it skipped (True) when over budget."""
    mem = measure.compiled_memory(compiled)
    if mem is None:
        return False
    row.update(memory_bytes=mem.total_bytes, temp_bytes=mem.temp_bytes, argument_bytes=mem.argument_bytes,
               output_bytes=mem.output_bytes, xla_peak_bytes=mem.xla_peak_bytes)
    if mem.total_bytes <= budget_bytes:
        return False
    row.update(status="skipped", reason=(
        f"memory budget: {what} needs {mem.total_bytes / MiB:.0f} MiB > "
        f"memory_budget_bytes={budget_bytes / MiB:.0f} MiB (memory_analysis, not run)"))
    return True


def measure_point(name: str, pass_: str, causal: bool, n: int, cfg: CostConfig, *,
                  matmul_gflops: float | None = None,
                  predicted_s: tuple[float, float] | None = None, from_n: int | None = None) -> dict[str, Any]:
    """Measure one (variant, pass, masking, N) point; never raises for a variant's failure."""
    row = _base_row(name, pass_, causal, n, cfg)
    row["matmul_gflops"] = matmul_gflops
    if predicted_s is not None and predicted_s[0] > cfg.max_call_s:
        row.update(status="skipped", reason=(
            f"time budget: predicted {predicted_s[0]:.2f} s per call > max_call_s={cfg.max_call_s:g} s "
            f"(extrapolated from N={from_n} with growth exponent {predicted_s[1]:.2f})"))
        return row
    try:
        fn, args = _point_function(name, pass_, causal, n, cfg)
        compiled, compile_s, jaxpr = measure.trace_and_compile(fn, *args)
        row["compile_s"] = compile_s
        if _record_memory(row, compiled, cfg.memory_budget_bytes, "compiled program"):
            return row
        row.update(measure.count_flops(fn, args, compiled, jaxpr=jaxpr))
        del jaxpr
        timing = measure.time_compiled(compiled, *args, warmup=cfg.warmup, min_repeats=cfg.min_repeats,
                                       max_repeats=cfg.max_repeats, budget_s=cfg.repeat_budget_s,
                                       compile_s=compile_s)
        row.update(time_median_s=timing.median_s, time_spread=timing.spread_s, time_spread_kind=timing.spread_kind,
                   time_min_s=timing.min_s, time_max_s=timing.max_s, repeats=timing.repeats)
        row["device_peak_bytes"] = measure.device_peak_bytes()
        if row["flops"]:
            row["gflops_per_s"] = row["flops"] / timing.median_s / 1e9
            if matmul_gflops:
                row["matmul_fraction"] = row["gflops_per_s"] / matmul_gflops
    except Exception as err:  # noqa: BLE001 - one variant's failure must not stop the sweep
        msg = " ".join(str(err).split())
        row.update(status="error", reason=f"{type(err).__name__}: {msg[:400]}")
    return row


# ----------------------------------------------------------------------------- the sweep

# Visiting order: a whole (pass, masking) mode, every length, before the next mode, so that a
# sweep stopped by its time budget has complete curves for the modes it reached.
MODES = (("fwd", False), ("fwd_bwd", False), ("fwd", True), ("fwd_bwd", True))


def _key(kind: str, variant: str, pass_: str, causal: bool, n: int, cfg: CostConfig) -> str:
    masking = "causal" if causal else "bidir"
    return report.RowStore.make_key(kind, variant, pass_, masking, n, cfg.batch, cfg.heads, cfg.head_dim, cfg.dtype)


def _is_done(row: dict | None, budget: dict[str, Any]) -> bool:
    """A stored row is final when ok, or skipped under the same budgets as now.

    Errors and points skipped for a sweep's deadline are tried again on a rerun; so are
    budget skips when a budget has changed since.
    """
    if row is None:
        return False
    if row.get("status") == "ok":
        return True
    if row.get("status") == "skipped" and not str(row.get("reason", "")).startswith("sweep budget"):
        return all(row.get(k) == v for k, v in budget.items())
    return False


def select_variants(cfg: CostConfig) -> list[str]:
    """The variants of ``cfg`` (every registered one when None); an unknown name raises KeyError."""
    names = ea.list_variants()
    if cfg.variants is None:
        return names
    for v in cfg.variants:
        if v not in names:
            ea.get_spec(v)  # raises KeyError with suggestions
    return list(dict.fromkeys(cfg.variants))


def _points(cfg: CostConfig, variants: Sequence[str]):
    for pass_, causal in MODES:
        if pass_ not in cfg.passes or causal not in cfg.causal_modes:
            continue
        for n in sorted(set(cfg.lengths)):
            for name in variants:
                if causal and not ea.get_spec(name).capabilities.causal:
                    continue
                yield name, pass_, causal, n


class _Budgets:
    """Per series: the measured (N, time) points, and the shortest N that went over a budget
    (longer lengths of that series are then skipped without trying)."""

    def __init__(self, max_compile_s: float):
        self.max_compile_s = max_compile_s
        self.history: dict[tuple, list[tuple[int, float]]] = {}
        self.over: dict[tuple, tuple[int, str]] = {}

    def _over(self, series: tuple, n: int, reason: str) -> None:
        if series not in self.over or n < self.over[series][0]:
            self.over[series] = (n, reason)

    def remember(self, row: dict, series: tuple, time_field: str) -> None:
        n = row["n"]
        if row.get("status") == "ok" and row.get(time_field):
            self.history.setdefault(series, []).append((n, row[time_field]))
            if (row.get("compile_s") or 0) > self.max_compile_s:
                self._over(series, n, f"compile budget: compiling N={n} took {row['compile_s']:.0f} s > "
                                      f"max_compile_s={self.max_compile_s:g} s")
        elif row.get("status") == "skipped" and str(row.get("reason", "")).startswith(("time budget", "memory budget")):
            self._over(series, n, f"over budget already at N={n} (see that row)")

    def predict(self, series: tuple, n: int, claimed: measure.Complexity | None):
        """(prediction, exponent) or None, and the length it was extrapolated from."""
        hist = self.history.get(series, [])
        below = [m for m, _ in hist if m < n]
        return _predict(hist, n, claimed), (max(below) if below else None)

    def skip_reason(self, series: tuple, n: int, t_start: float, deadline: float | None) -> str | None:
        if deadline is not None and time.perf_counter() - t_start > deadline:
            return f"sweep budget: {deadline:g} s spent before this point (rerun to resume)"
        if series in self.over and n > self.over[series][0]:
            return self.over[series][1]
        return None


def run(cfg: CostConfig, out: str | Path, *, force: bool = False, progress: bool = True) -> report.RowStore:
    """Measure every point of ``cfg`` not already in ``out/rows.jsonl``; write the tables and plots.

    Tables are rebuilt from the store when the sweep ends, fails or is interrupted.
    """
    out = Path(out)
    store = report.RowStore(out / "rows.jsonl", force=force)
    variants = select_variants(cfg)
    points = list(_points(cfg, variants))
    info: dict[str, Any] = {"load_avg_start": _load_avg()}
    try:
        info.update(measure.matmul_rate(cfg.matmul_n, budget_s=min(1.0, max(cfg.repeat_budget_s, 0.3))))
        # the ceiling is the best call: on a shared CPU the median is pulled down by other processes
        info["matmul_gflops"] = info["matmul_best_gflops"]
        info["matmul_best_gflops_start"] = info["matmul_best_gflops"]
        budgets = _Budgets(cfg.max_compile_s)
        budget = {"max_call_s": cfg.max_call_s, "max_compile_s": cfg.max_compile_s,
                  "memory_budget_bytes": cfg.memory_budget_bytes}
        bar = _progress(len(points), progress, "cost")
        t_start = time.perf_counter()
        last = None
        try:
            for name, pass_, causal, n in points:
                series = (name, pass_, causal)
                key = _key("cost", name, pass_, causal, n, cfg)
                bar.set_postfix_str(f"{name} N={n} {pass_}{' causal' if causal else ''}")
                prev = store.get(key)
                if not force and _is_done(prev, budget):
                    budgets.remember(prev, series, "time_median_s")
                    bar.update(1)
                    continue
                if (pass_, causal) != last:  # drop the compiled programs of the previous mode
                    jax.clear_caches()
                    last = (pass_, causal)
                reason = budgets.skip_reason(series, n, t_start, cfg.sweep_budget_s)
                if reason is not None:
                    row = _base_row(name, pass_, causal, n, cfg)
                    row.update(status="skipped", reason=reason)
                else:
                    predicted, from_n = budgets.predict(series, n, _claimed(ea.get_spec(name), "time"))
                    row = measure_point(name, pass_, causal, n, cfg, matmul_gflops=info["matmul_gflops"],
                                        predicted_s=predicted, from_n=from_n)
                store.add(key, row)
                budgets.remember(row, series, "time_median_s")
                bar.update(1)
        finally:
            bar.close()
        if cfg.table2.enabled:
            run_table2(cfg, variants, store, force=force, progress=progress)
        # measure the ceiling again at the end and keep the better: other processes may have left
        end = measure.matmul_rate(cfg.matmul_n, budget_s=min(1.0, max(cfg.repeat_budget_s, 0.3)))
        info["matmul_best_gflops_end"] = end["matmul_best_gflops"]
        info["matmul_gflops"] = max(info["matmul_gflops"], end["matmul_best_gflops"])
    finally:
        _module_state.cache_clear()
        info["load_avg_end"] = _load_avg()
        write_outputs(out, store.rows(), cfg, info)
    return store


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


class _LineProgress:
    """The progress bar's stand-in for log files: one flushed line per point, no carriage returns."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.postfix = total, desc, 0, ""
        self.t0 = time.perf_counter()

    def set_postfix_str(self, text: str, *a, **k):
        self.postfix = text

    def update(self, k: int = 1):
        self.done += k
        print(f"{self.desc} [{self.done}/{self.total}] {self.postfix} ({time.perf_counter() - self.t0:.0f} s)",
              flush=True)

    def close(self):
        pass


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _LineProgress(total, desc)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pt", file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------- analysis


def _current(rows: Sequence[dict], cfg: CostConfig, kind: str = "cost") -> list[dict]:
    dims = (cfg.batch, cfg.heads, cfg.head_dim, cfg.dtype)
    return [r for r in rows if r.get("kind", "cost") == kind
            and (r.get("batch"), r.get("heads"), r.get("head_dim"), r.get("dtype")) == dims]


def _series(rows: Sequence[dict]) -> dict[tuple[str, bool], dict[str, dict[int, dict]]]:
    """(pass, causal) -> variant -> n -> row."""
    out: dict[tuple[str, bool], dict[str, dict[int, dict]]] = {}
    for r in rows:
        out.setdefault((r["pass"], bool(r["causal"])), {}).setdefault(r["variant"], {})[int(r["n"])] = r
    return out


def _ok(r: dict | None, field: str) -> float | None:
    if r is None or r.get("status") != "ok":
        return None
    v = r.get(field)
    return float(v) if v is not None and v > 0 else None


def analyse(rows: Sequence[dict]) -> dict[tuple[str, bool], dict[str, dict[str, Any]]]:
    """Per (pass, causal) and variant: slopes (all points and the 3 longest), claimed slopes, crossovers."""
    result: dict[tuple[str, bool], dict[str, dict[str, Any]]] = {}
    for group, by_variant in _series(rows).items():
        res = result.setdefault(group, {})
        for name, by_n in by_variant.items():
            ns = sorted(by_n)
            info: dict[str, Any] = {"ns": ns}
            for field, which in (("time_median_s", "time"), ("memory_bytes", "memory")):
                pts = [(n, _ok(by_n[n], field)) for n in ns if _ok(by_n[n], field)]
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
            for base in BASELINES:
                b = by_variant.get(base)
                if b is None or base == name:
                    continue
                common = [n for n in ns if n in b]
                vt = [_ok(by_n[n], "time_median_s") for n in common]
                bt = [_ok(b[n], "time_median_s") for n in common]
                vm = [_ok(by_n[n], "memory_bytes") for n in common]
                bm = [_ok(b[n], "memory_bytes") for n in common]
                info[f"cross_time_{base}"] = measure.crossover(common, vt, bt)
                info[f"cross_memory_{base}"] = measure.crossover(common, vm, bm)
                info[f"cross_both_{base}"] = measure.crossover(common, vt, bt, variant_extra=vm, baseline_extra=bm)
                # lengths where the baseline could not run (over budget) but the variant could
                info[f"beyond_{base}"] = [n for n in ns if _ok(by_n[n], "time_median_s") and n in b
                                          and b[n].get("status") == "skipped"
                                          and not str(b[n].get("reason", "")).startswith("sweep budget")]
            res[name] = info
    return result


# ----------------------------------------------------------------------------- tables


def _order(v: str) -> tuple:
    """Baselines first (full, blockwise), then the rest alphabetically."""
    return (BASELINES.index(v) if v in BASELINES else len(BASELINES), v)


def _ms(x):
    return None if x is None else 1e3 * x


def _mib(x):
    return None if x is None else x / MiB


def _cell(r: dict | None, field: str, scale) -> Any:
    if r is None:
        return None
    if r.get("status") == "ok":
        return scale(r.get(field))
    if r.get("status") == "skipped":
        if field == "memory_bytes" and r.get("memory_bytes"):
            return f"({scale(r['memory_bytes']):.0f}, not run)"
        return "skip"
    return "error"


def _ratio_cell(r: dict | None, by_base: dict[str, dict[int, dict]], n: int, field: str, invert: bool) -> str:
    parts = []
    for base in BASELINES:
        b = by_base.get(base, {}).get(n)
        v, bv = _ok(r, field), _ok(b, field)
        if v is None or bv is None:
            parts.append("-")
        else:
            parts.append(f"{(bv / v if invert else v / bv):.2g}")
    return " / ".join(parts)


def _fmt_cross(c: measure.Crossover | None) -> str:
    if c is None or not c.ns:
        return "-"
    if c.n is None:
        return f"none <= {c.ns[-1]}"
    if c.from_start:
        return f"<= {c.n}"
    return f"{c.n} (~{c.n_interp:.0f})"


def _fmt_slope(fit: measure.Fit | None) -> str:
    return "-" if fit is None else f"{fit.slope:.2f}"


_PASS_TITLE = {"fwd": "Forward", "fwd_bwd": "Forward + backward"}


def cost_markdown(rows: Sequence[dict], cfg: CostConfig, rate: dict[str, float] | None, env: dict) -> str:
    rows = _current(rows, cfg)
    groups = _series(rows)
    analysis = analyse(rows)
    lines = [f"# Cost scaling: preset `{cfg.preset}`", ""]
    lines.append(
        f"q, k, v of shape [B={cfg.batch}, N, H={cfg.heads}, D={cfg.head_dim}], {cfg.dtype}, on "
        f"{env.get('device')} ({env.get('cpu')}, {env.get('cpu_cores')} cores), jax {env.get('jax')}. "
        + (f"Matmul ceiling measured in this run: {rate['matmul_gflops']:.0f} GFLOP/s (best call of an f32 "
           f"{rate['matmul_n']}^3 product, measured at the start and at the end of the run). "
           if rate and rate.get("matmul_gflops") else "")
        + (f"Load average (1, 5, 15 min) at the start of this run: {rate['load_avg_start']}, at the end: "
           f"{rate.get('load_avg_end')}; above the core count, other processes shared the CPU and times are "
           "inflated. " if rate and rate.get("load_avg_start") else "")
    )
    lines.append("")
    lines.append(
        "Time: median of timed calls after a warm-up, each inside `jax.block_until_ready`; compile "
        "time is apart (`compile_s` in rows.csv). Memory: `compiled.memory_analysis()` argument + "
        "output + temporary bytes of one call (`temp_bytes` alone in rows.csv). `fwd_bwd` is the "
        "gradient of <out, g> with respect to q, k, v and the variant's parameters. `skip`: over a "
        "budget (reason in rows.csv); `(M, not run)`: compiled memory M MiB over the memory budget."
    )
    lines.append("")
    notes: list[str] = []
    for (pass_, causal) in sorted(groups, key=lambda g: (PASSES.index(g[0]) if g[0] in PASSES else 9, g[1])):
        by_variant = groups[(pass_, causal)]
        info = analysis[(pass_, causal)]
        ns = sorted({n for v in by_variant.values() for n in v})
        title = f"{_PASS_TITLE.get(pass_, pass_)}, {'causal' if causal else 'bidirectional'}"
        names = sorted(by_variant, key=_order)
        group_rows = [r for v in by_variant.values() for r in v.values()]
        if not any(r.get("status") == "ok" for r in group_rows):
            reasons = sorted({_reason_kind(r) for r in group_rows})
            lines += [f"## {title}", "", f"Not measured: all {len(group_rows)} points skipped or failed "
                      f"({'; '.join(reasons)}); rerun to resume.", ""]
            continue
        lines += [f"## {title}", "", "Time per call (ms); slope = least-squares log-log fit over the measured "
                  "lengths (tail: the 3 longest), claimed = the capabilities' exponent.", ""]
        head = ["variant", "claims"] + [f"N={n}" for n in ns] + ["slope", "tail slope", "claimed"]
        body = []
        for v in names:
            i = info[v]
            body.append([v, i["time_claim_text"]] + [_cell(by_variant[v].get(n), "time_median_s", _ms) for n in ns]
                        + [_fmt_slope(i["time_fit"]), _fmt_slope(i["time_tail_fit"]), i["time_claimed"]])
        lines += [report.markdown_table(head, body)]
        lines += ["Memory per call (MiB, compiled arguments + outputs + temporaries).", ""]
        head = ["variant", "claims"] + [f"N={n}" for n in ns] + ["slope", "tail slope", "claimed"]
        body = []
        for v in names:
            i = info[v]
            body.append([v, i["memory_claim_text"]] + [_cell(by_variant[v].get(n), "memory_bytes", _mib) for n in ns]
                        + [_fmt_slope(i["memory_fit"]), _fmt_slope(i["memory_tail_fit"]), i["memory_claimed"]])
        lines += [report.markdown_table(head, body)]
        lines += ["Speed-up (baseline time / variant time) and memory ratio (variant memory / baseline "
                  "memory), each as `vs full / vs blockwise`.", ""]
        head = ["variant"] + [f"speed-up N={n}" for n in ns] + [f"memory N={n}" for n in ns]
        body = []
        for v in names:
            body.append([v] + [_ratio_cell(by_variant[v].get(n), by_variant, n, "time_median_s", True) for n in ns]
                        + [_ratio_cell(by_variant[v].get(n), by_variant, n, "memory_bytes", False) for n in ns])
        lines += [report.markdown_table(head, body)]
        lines += ["Crossover N: the smallest measured N from which the variant is better than the baseline "
                  "at every longer measured N (`~`: interpolated in log-log between the last losing and the "
                  "first winning length; `<= N`: better from the first length; `none <= N`: not better at "
                  "the longest length both measured). `both` = faster and less memory. Matmul fraction: "
                  "FLOPs / time at the longest measured N, over this run's matmul rate.", ""]
        head = ["variant", "time vs full", "memory vs full", "both vs full", "time vs blockwise",
                "memory vs blockwise", "both vs blockwise", "FLOPs source", "matmul fraction"]
        body = []
        for v in names:
            i = info[v]
            last = next((by_variant[v][n] for n in reversed(ns) if _ok(by_variant[v].get(n), "time_median_s")), None)
            body.append([v, _fmt_cross(i.get("cross_time_full")), _fmt_cross(i.get("cross_memory_full")),
                         _fmt_cross(i.get("cross_both_full")), _fmt_cross(i.get("cross_time_blockwise")),
                         _fmt_cross(i.get("cross_memory_blockwise")), _fmt_cross(i.get("cross_both_blockwise")),
                         last.get("flops_source") if last else None,
                         last.get("matmul_fraction") if last else None])
        lines += [report.markdown_table(head, body)]
        notes += _notes(title, by_variant, info, ns)
    load = (rate or {}).get("load_avg_start") or []
    cores = env.get("cpu_cores") or 0
    if load and cores and max(load[0], ((rate or {}).get("load_avg_end") or [0])[0]) > cores:
        notes.insert(0, f"Other processes shared the CPU during this run (load average {load[0]} at the start, "
                        f"{cores} cores): times are inflated and noisy (few repeats per point), so slopes and "
                        "crossovers are rough; memory and FLOPs are unaffected. Rerun on an idle machine with "
                        "`--force` for clean timings.")
    deadline = [r for r in rows if str(r.get("reason", "")).startswith("sweep budget")]
    if deadline:
        notes.append(f"{len(deadline)} of {len(rows)} points were not reached within the sweep's time budget "
                     "(`sweep_budget_s`); the same command resumes them.")
    if rate and rate.get("matmul_gflops") and any((r.get("gflops_per_s") or 0) > rate["matmul_gflops"] for r in rows):
        notes.append("Some matmul fractions exceed 1: the matmul ceiling was measured while other processes "
                     "shared the CPU (see the load average), so it understates this machine's rate.")
    lines += ["## Notes", ""]
    lines += [f"- {n}" for n in notes] if notes else ["- Every fitted slope is within 0.3 of its claim."]
    lines.append("")
    return "\n".join(lines)


def _reason_kind(r: dict) -> str:
    """The reason of a row that did not run, without its numbers ("sweep budget", "time budget"...)."""
    if r.get("status") == "error":
        return "error"
    return str(r.get("reason", "")).split(":", 1)[0] or str(r.get("status"))


def _notes(title: str, by_variant: dict, info: dict, ns: list[int]) -> list[str]:
    out = []
    for v in sorted(info):
        i = info[v]
        for which in ("time", "memory"):
            fit, tail, claimed = i[f"{which}_fit"], i[f"{which}_tail_fit"], i[f"{which}_claimed"]
            if fit is None or claimed is None:
                continue
            slope = tail.slope if tail is not None else fit.slope
            d = slope - claimed
            if abs(d) <= 0.3:
                continue
            if d < 0:
                why = ("below the claim: at these lengths costs that do not grow like the claimed term "
                       "(dispatch, the O(N d) projections and reshapes, the inputs and outputs themselves in "
                       "the memory count) still dominate, so the asymptotic exponent is not reached yet"
                       if which == "time" or claimed > 1 else
                       "below the claim: buffers of fixed size (block scratch space, parameters, random "
                       "features) are still a large part of the total")
            else:
                why = ("above the claim: the implementation does more than its claimed asymptotics at "
                       "these lengths (a pass that grows faster, e.g. a sort, a padded or a dense step), "
                       "or the working set has left the CPU caches")
            out.append(f"{title}, `{v}` {which}: slope {slope:.2f} over the longest lengths "
                       f"(all lengths: {fit.slope:.2f}) against the claimed {claimed:.2f} "
                       f"({i[f'{which}_claim_text']}); {why}.")
        for base in BASELINES:
            beyond = i.get(f"beyond_{base}")
            if beyond:
                out.append(f"{title}, `{v}`: ran at N={', '.join(map(str, beyond))} where `{base}` was over budget; "
                           "crossovers use only lengths both measured.")
        loops = [n for n, r in sorted(by_variant[v].items()) if r.get("flops_source") == "jaxpr_lower_bound"]
        if loops:
            out.append(f"{title}, `{v}`: FLOPs are a lower bound (a while loop with a data-dependent trip count "
                       "was counted once), so its matmul fraction is understated.")
        bad = [(n, r["status"], r.get("reason", "")) for n, r in sorted(by_variant[v].items())
               if r.get("status") == "error"]
        for n, _, reason in bad[:2]:
            out.append(f"{title}, `{v}` failed at N={n}: {reason[:200]}")
    return out


# ----------------------------------------------------------------------------- plots


def plot(rows: Sequence[dict], cfg: CostConfig, field: str, path: Path, ylabel: str, scale: float) -> None:
    """Log-log curves of ``field`` against N, one line per variant (baselines dashed), a panel per
    pass (rows) and masking (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = _series(_current(rows, cfg))
    if not groups:
        return
    passes = [p for p in PASSES if any(g[0] == p for g in groups)]
    maskings = [c for c in (False, True) if any(g[1] == c for g in groups)]
    fig, axes = plt.subplots(len(passes), len(maskings), figsize=(5.0 * len(maskings) + 2.2, 4.0 * len(passes)),
                             squeeze=False)
    names = sorted({v for g in groups.values() for v in g}, key=_order)
    cmap = plt.get_cmap("tab20")
    others = [v for v in names if v not in BASELINES]
    colors = {"full": "black", "blockwise": "tab:red"}
    colors.update({v: cmap(i % 20) for i, v in enumerate(others)})
    for i, pass_ in enumerate(passes):
        for j, causal in enumerate(maskings):
            ax = axes[i][j]
            ax.set_title(f"{_PASS_TITLE.get(pass_, pass_)}, {'causal' if causal else 'bidirectional'}", fontsize=10)
            for v in names:
                by_n = groups.get((pass_, causal), {}).get(v, {})
                pts = [(n, _ok(by_n[n], field)) for n in sorted(by_n) if _ok(by_n[n], field)]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                base = v in BASELINES
                ax.plot(xs, [y / scale for y in ys], marker="o", markersize=3, color=colors[v], label=v,
                        linestyle="--" if base else "-", linewidth=2.0 if base else 1.2, zorder=3 if base else 2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


# ----------------------------------------------------------------------------- outputs


CSV_COLUMNS = [
    "kind", "variant", "n", "pass", "causal", "status", "reason", "time_median_s", "time_spread", "time_spread_kind",
    "time_min_s", "time_max_s", "repeats", "compile_s", "memory_bytes", "temp_bytes", "argument_bytes",
    "output_bytes", "xla_peak_bytes", "device_peak_bytes", "flops", "flops_source", "flops_xla", "flops_jaxpr",
    "gflops_per_s", "matmul_gflops", "matmul_fraction", "steps_per_s", "speedup_vs_full", "memory_vs_full",
    "claimed_time", "claimed_memory", "family", "exact", "batch", "heads", "head_dim", "dtype",
    "num_layers", "emb_dim", "mlp_dim", "max_call_s", "max_compile_s", "memory_budget_bytes",
]


def write_outputs(out: str | Path, rows: Sequence[dict], cfg: CostConfig, info: dict[str, Any] | None) -> None:
    """rows.csv, rows.json, table.md, time.png, memory.png (and table2.md) from the stored rows.

    ``info``: this run's matmul rate and load averages, added to the environment stamp.
    """
    out = Path(out)
    rows = [dict(r, kind=r.get("kind", "cost")) for r in rows]
    enriched = {id(r): e for r, e in zip(_table2_current(rows, cfg), table2_rows(rows, cfg))}
    rows = [enriched.get(id(r), r) for r in rows]
    start, ceiling = (info or {}).get("matmul_best_gflops_start"), (info or {}).get("matmul_gflops")
    if start and ceiling and ceiling != start:  # rows of this run: against the run's final ceiling
        for r in rows:
            if r.get("matmul_gflops") == start and r.get("gflops_per_s"):
                r.update(matmul_gflops=ceiling, matmul_fraction=r["gflops_per_s"] / ceiling)
    env = report.environment(cfg.preset, **(info or {}))
    report.write_csv(out / "rows.csv", rows, CSV_COLUMNS)
    report.write_json(out / "rows.json", {"environment": env, "config": dataclasses.asdict(cfg), "rows": rows})
    report.write_atomic(out / "table.md", cost_markdown(rows, cfg, info, env))
    plot(rows, cfg, "time_median_s", out / "time.png", "time per call (s)", 1.0)
    plot(rows, cfg, "memory_bytes", out / "memory.png", "compiled memory (MiB)", MiB)
    if _table2_current(rows, cfg):
        report.write_atomic(out / "table2.md", table2_markdown(rows, cfg, env))


# ----------------------------------------------------------------------------- LRA Table 2 analog

# Tay et al. 2020, Long Range Arena, Table 2: steps/s and peak memory (GB) on byte-level text,
# 4x4 TPU v3, batch 32, at lengths 1K, 2K, 3K, 4K; keyed by the name of the variant here.
PUBLISHED_TABLE2: dict[str, tuple[str, tuple[float, ...], tuple[float, ...]]] = {
    "full": ("Transformer", (8.1, 4.9, 2.3, 1.4), (0.85, 2.65, 5.51, 9.48)),
    "local": ("Local", (9.2, 8.4, 7.4, 7.4), (0.42, 0.76, 1.06, 1.37)),
    "linformer": ("Linformer", (9.3, 9.1, 8.5, 7.7), (0.37, 0.55, 0.99, 0.99)),
    "reformer": ("Reformer", (4.4, 2.2, 1.5, 1.1), (0.48, 0.99, 1.53, 2.28)),
    "sinkhorn": ("Sinkhorn", (9.1, 7.9, 6.6, 5.3), (0.47, 0.83, 1.13, 1.48)),
    "synthesizer": ("Synthesizer", (8.7, 5.7, 6.6, 1.9), (0.65, 1.98, 4.09, 6.99)),
    "bigbird": ("BigBird", (7.4, 3.9, 2.7, 1.5), (0.77, 1.49, 2.18, 2.88)),
    "linear": ("Linear Trans.", (9.1, 9.3, 8.6, 7.8), (0.37, 0.57, 0.80, 1.03)),
    "performer": ("Performer", (9.5, 9.4, 8.7, 8.0), (0.37, 0.59, 0.82, 1.06)),
}
PUBLISHED_LENGTHS = (1024, 2048, 3072, 4096)
TEXT_VOCAB = 256  # byte-level text
TEXT_CLASSES = 2  # IMDb sentiment


def _table2_available() -> str | None:
    """None when efficient_attn.nn / efficient_attn.train provide what Table 2 needs, else why not."""
    try:
        from efficient_attn import nn, train
    except ImportError as err:
        return f"efficient_attn.nn / efficient_attn.train not importable ({err})"
    missing = [f"nn.{a}" for a in ("Classifier", "EncoderConfig") if not hasattr(nn, a)]
    missing += [f"train.{a}" for a in ("TrainConfig", "make_optimizer") if not hasattr(train, a)]
    return f"missing {', '.join(missing)}" if missing else None


def _table2_key(variant: str, n: int, cfg: CostConfig) -> str:
    t = cfg.table2
    return report.RowStore.make_key("table2", variant, n, t.batch, t.num_layers, t.emb_dim, t.num_heads, t.mlp_dim)


def _train_step_function(name: str, n: int, cfg: CostConfig):
    """(step, args): one optimiser step of the byte-level text classifier with variant ``name``.

    The model is ``nn.Classifier`` (LRA's encoder) with mean pooling, so that the attention
    sees exactly ``n`` positions (CLS pooling would make it n + 1, which block-based variants
    pad); no padding mask, since every variant must run and random bytes fill every position
    (the cost does not depend on the bytes). ``fast_exact=False``: the ``full`` row is the
    quadratic einsum Transformer, as in LRA's table, not the blockwise kernel. The optimiser is ``train.make_optimizer`` with
    LRA's text settings (lr 0.05 with rsqrt decay, weight decay 0.1, warm-up 8000).
    """
    from efficient_attn import nn, train

    t = cfg.table2
    ecfg = nn.EncoderConfig(vocab_size=TEXT_VOCAB, max_len=n, num_classes=TEXT_CLASSES, num_layers=t.num_layers,
                            emb_dim=t.emb_dim, num_heads=t.num_heads, mlp_dim=t.mlp_dim, pool="mean", attention=name,
                            fast_exact=False)
    model = nn.Classifier(ecfg, rngs=nnx.Rngs(cfg.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = train.make_optimizer(train.TrainConfig(lr=0.05, weight_decay=0.1, warmup=8000, steps=20000,
                                                batch_size=t.batch, schedule="rsqrt"))
    opt_state = tx.init(params)
    rng = np.random.default_rng(cfg.seed)
    tokens = jnp.asarray(rng.integers(0, TEXT_VOCAB, (t.batch, n)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, TEXT_CLASSES, (t.batch,)), jnp.int32)

    def step(params, opt_state, rest, tokens, labels):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, (params, opt_state, rest, tokens, labels)


def measure_train_step(name: str, n: int, cfg: CostConfig, *, predicted_s: tuple[float, float] | None = None,
                       from_n: int | None = None) -> dict[str, Any]:
    """Steps per second and compiled memory of one training step; never raises for a variant."""
    t = cfg.table2
    spec = ea.get_spec(name)
    row: dict[str, Any] = {
        "kind": "table2", "variant": name, "n": n, "pass": "train_step", "causal": False, "status": "ok",
        "reason": "", "family": spec.family, "exact": spec.capabilities.exact,
        "claimed_time": spec.capabilities.time, "claimed_memory": spec.capabilities.memory,
        "batch": t.batch, "num_layers": t.num_layers, "emb_dim": t.emb_dim, "heads": t.num_heads,
        "mlp_dim": t.mlp_dim, "dtype": "float32", "time_median_s": None, "time_spread": None,
        "steps_per_s": None, "repeats": 0, "compile_s": None, "memory_bytes": None, "temp_bytes": None,
        "max_call_s": t.max_step_s, "max_compile_s": cfg.max_compile_s, "memory_budget_bytes": t.memory_budget_bytes,
    }
    if predicted_s is not None and predicted_s[0] > t.max_step_s:
        row.update(status="skipped", reason=(
            f"time budget: predicted {predicted_s[0]:.2f} s per step > max_step_s={t.max_step_s:g} s "
            f"(extrapolated from N={from_n} with growth exponent {predicted_s[1]:.2f})"))
        return row
    try:
        fn, args = _train_step_function(name, n, cfg)
        compiled, compile_s = measure.compile_function(fn, *args)
        row["compile_s"] = compile_s
        if _record_memory(row, compiled, t.memory_budget_bytes, "compiled step"):
            return row
        timing = measure.time_compiled(compiled, *args, warmup=t.warmup, min_repeats=t.min_repeats,
                                       max_repeats=t.max_repeats, budget_s=t.step_budget_s, compile_s=compile_s)
        row.update(time_median_s=timing.median_s, time_spread=timing.spread_s, time_spread_kind=timing.spread_kind,
                   time_min_s=timing.min_s, time_max_s=timing.max_s, repeats=timing.repeats,
                   steps_per_s=1.0 / timing.median_s, device_peak_bytes=measure.device_peak_bytes())
    except Exception as err:  # noqa: BLE001 - one variant's failure must not stop the sweep
        msg = " ".join(str(err).split())
        row.update(status="error", reason=f"{type(err).__name__}: {msg[:400]}")
    return row


def run_table2(cfg: CostConfig, variants: Sequence[str], store: report.RowStore, *, force: bool = False,
               progress: bool = True) -> None:
    """Training steps/s and compiled memory of the text classifier per variant and length (in ``store``)."""
    why = _table2_available()
    if why is not None:
        print(f"cost: LRA Table 2 analog not run: {why}", file=sys.stderr)
        return
    t = cfg.table2
    budgets = _Budgets(cfg.max_compile_s)
    budget = {"max_call_s": t.max_step_s, "max_compile_s": cfg.max_compile_s,
              "memory_budget_bytes": t.memory_budget_bytes}
    points = [(name, n) for n in dict.fromkeys(t.lengths) for name in variants]  # in the config's order
    bar = _progress(len(points), progress, "table2")
    t_start = time.perf_counter()
    try:
        for name, n in points:
            key = _table2_key(name, n, cfg)
            bar.set_postfix_str(f"{name} N={n} train step")
            prev = store.get(key)
            if not force and _is_done(prev, budget):
                budgets.remember(prev, (name,), "time_median_s")
                bar.update(1)
                continue
            reason = budgets.skip_reason((name,), n, t_start, t.budget_s)
            if reason is not None:
                spec = ea.get_spec(name)
                row = {"kind": "table2", "variant": name, "n": n, "pass": "train_step", "causal": False,
                       "status": "skipped", "reason": reason, "family": spec.family, "batch": t.batch,
                       "num_layers": t.num_layers, "emb_dim": t.emb_dim, "heads": t.num_heads, "mlp_dim": t.mlp_dim,
                       "dtype": "float32", "max_call_s": t.max_step_s, "max_compile_s": cfg.max_compile_s,
                       "memory_budget_bytes": t.memory_budget_bytes}
            else:
                predicted, from_n = budgets.predict((name,), n, _claimed(ea.get_spec(name), "time"))
                row = measure_train_step(name, n, cfg, predicted_s=predicted, from_n=from_n)
            store.add(key, row)
            budgets.remember(row, (name,), "time_median_s")
            bar.update(1)
    finally:
        bar.close()


def _table2_current(rows: Sequence[dict], cfg: CostConfig) -> list[dict]:
    t = cfg.table2
    dims = (t.batch, t.num_layers, t.emb_dim, t.num_heads, t.mlp_dim)
    return [r for r in rows if r.get("kind") == "table2"
            and (r.get("batch"), r.get("num_layers"), r.get("emb_dim"), r.get("heads"), r.get("mlp_dim")) == dims]


def table2_rows(rows: Sequence[dict], cfg: CostConfig) -> list[dict]:
    """The Table 2 rows of ``cfg``'s model with ``speedup_vs_full`` and ``memory_vs_full`` filled in."""
    rows = [dict(r) for r in _table2_current(rows, cfg)]
    full = {r["n"]: r for r in rows if r["variant"] == "full"}
    for r in rows:
        f = full.get(r["n"])
        v, fv = _ok(r, "steps_per_s"), _ok(f, "steps_per_s")
        r["speedup_vs_full"] = v / fv if v and fv else None
        m, fm = _ok(r, "memory_bytes"), _ok(f, "memory_bytes")
        r["memory_vs_full"] = m / fm if m and fm else None
    return rows


def table2_markdown(rows: Sequence[dict], cfg: CostConfig, env: dict) -> str:
    t = cfg.table2
    rows = table2_rows(rows, cfg)
    by = {(r["variant"], r["n"]): r for r in rows}
    names = sorted({r["variant"] for r in rows}, key=_order)
    ns = sorted({r["n"] for r in rows})
    lines = [
        f"# LRA Table 2 analog: training speed and memory, byte-level text (preset `{cfg.preset}`)", "",
        f"One optimiser step (forward, backward, AdamW update) of the LRA text classifier scaled down to "
        f"{t.num_layers} layer(s), width {t.emb_dim}, {t.num_heads} heads, MLP {t.mlp_dim}, batch {t.batch}, "
        f"mean pooling, float32, on {env.get('device')} ({env.get('cpu')}). Steps/s = 1 / median step time "
        "(compile excluded), with the speed-up against `full` in parentheses; memory = compiled "
        "(`memory_analysis`) arguments + outputs + temporaries of the step in MiB, with the ratio to `full`.",
        "",
        "The LRA columns are the published Table 2 (Tay et al. 2020, 4x4 TPU v3, batch 32, width 256, "
        "4 layers; steps/s with speed-up, peak memory in GB). Compare the ratios, not the absolute "
        "numbers: the hardware, model size and batch differ.", "",
    ]

    def cell(value, ratio, fmt):
        if value is None:
            return None
        return f"{fmt(value)} ({ratio:.2f}x)" if ratio is not None else fmt(value)

    def ours(v, n, field, ratio_field, fmt):
        r = by.get((v, n))
        if r is None:
            return None
        if r.get("status") != "ok":
            return r.get("status")
        return cell(r.get(field), r.get(ratio_field), fmt)

    pub_ns = [n for n in PUBLISHED_LENGTHS]
    head = (["variant"] + [f"steps/s {n // 1024}K" if n % 1024 == 0 else f"steps/s {n}" for n in ns]
            + [f"MiB {n // 1024}K" if n % 1024 == 0 else f"MiB {n}" for n in ns]
            + ["LRA model"] + [f"LRA steps/s {n // 1024}K" for n in pub_ns] + [f"LRA GB {n // 1024}K" for n in pub_ns])
    body = []
    base = PUBLISHED_TABLE2["full"]
    for v in names:
        pub = PUBLISHED_TABLE2.get(v)
        row = [v]
        row += [ours(v, n, "steps_per_s", "speedup_vs_full", lambda x: f"{x:.3g}") for n in ns]
        row += [ours(v, n, "memory_bytes", "memory_vs_full", lambda x: f"{x / MiB:.0f}") for n in ns]
        if pub:
            row += [pub[0]]
            row += [f"{s:g} ({s / b:.1f}x)" for s, b in zip(pub[1], base[1])]
            row += [f"{m:g} ({m / b:.2f}x)" for m, b in zip(pub[2], base[2])]
        else:
            row += ["-"] + [None] * (2 * len(pub_ns))
        body.append(row)
    lines.append(report.markdown_table(head, body))
    bad = [r for r in rows if r.get("status") != "ok"]
    late = [r for r in bad if str(r.get("reason", "")).startswith("sweep budget")]
    if bad:
        lines += ["Not measured:", ""]
        lines += [f"- `{r['variant']}` at N={r['n']}: {r['status']}: {r.get('reason', '')[:200]}"
                  for r in bad if r not in late]
        if late:
            lines.append(f"- {len(late)} points not reached within the Table 2 time budget (`budget_s`): "
                         + ", ".join(f"`{r['variant']}` {r['n']}" for r in late[:40])
                         + (", ..." if len(late) > 40 else "") + "; the same command resumes them.")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="efficient-attn bench",
        description="Cost of every attention variant against the sequence length: time, memory, FLOPs, "
                    "slopes and crossovers against full and blockwise, and the LRA Table 2 analog.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="named configuration (default quick)")
    p.add_argument("--variants", help="comma-separated variant names (default: every registered variant)")
    p.add_argument("--lengths", help="comma-separated sequence lengths, e.g. 256,512,1024")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                   help="import a Python file that registers more variants (repeatable)")
    p.add_argument("--force", action="store_true", help="discard stored rows and measure everything again")
    p.add_argument("--out", help="output folder (default results/cost/<preset>)")
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--passes", help="comma-separated subset of fwd,fwd_bwd")
    p.add_argument("--no-table2", action="store_true", help="skip the LRA Table 2 analog")
    p.add_argument("--sweep-budget", type=float, help="seconds after which remaining points are skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> CostConfig:
    cfg = PRESETS[args.preset]
    changes: dict[str, Any] = {}
    if args.variants:
        changes["variants"] = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if args.lengths:
        try:
            changes["lengths"] = tuple(int(x) for x in args.lengths.split(",") if x.strip())
        except ValueError:
            raise SystemExit(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
    if args.passes:
        changes["passes"] = tuple(x.strip() for x in args.passes.split(",") if x.strip())
    for field, value in (("batch", args.batch), ("heads", args.heads), ("head_dim", args.head_dim),
                         ("sweep_budget_s", args.sweep_budget)):
        if value is not None:
            changes[field] = value
    if args.no_table2:
        changes["table2"] = dataclasses.replace(cfg.table2, enabled=False)
    return dataclasses.replace(cfg, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    """``efficient-attn bench`` / ``experiments/cost_scaling.py``: run a preset, write results/cost/<preset>/."""
    args = parse_args(argv)
    for path in args.plugin:
        load_plugin(path)
    try:
        cfg = config_from_args(args)
        select_variants(cfg)
    except (ValueError, KeyError) as err:
        raise SystemExit(f"efficient-attn bench: {err.args[0] if err.args else err}") from None
    out = Path(args.out) if args.out else Path("results") / "cost" / cfg.preset
    t0 = time.perf_counter()
    try:
        store = run(cfg, out, force=args.force, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ncost: interrupted; finished rows are kept in {out / 'rows.jsonl'} and the tables were "
              "rebuilt from them; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    counts = {s: sum(r.get("status") == s for r in store.rows()) for s in ("ok", "skipped", "error")}
    print(f"cost: {len(store)} rows ({counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} errors) "
          f"in {time.perf_counter() - t0:.0f} s -> {out}/table.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
