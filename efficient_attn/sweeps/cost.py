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

This module measures and stores; ``sweeps/cost_report.py`` reads the stored rows and writes
the tables and plots (slopes, ratios, crossovers, Table 2).

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
from efficient_attn.sweeps.cost_report import PASSES, MiB, write_outputs

__all__ = ["CostConfig", "Table2Config", "PRESETS", "run", "write_outputs", "main"]

GiB = 1024**3


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


# ----------------------------------------------------------------------------- LRA Table 2 analog

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
