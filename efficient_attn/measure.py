"""Measuring cost honestly: wall time, compiled memory, FLOPs, the machine's matmul ceiling, exponent fits.

Time.   ``compile_function`` jit-lowers and compiles a function and times that apart
        (``compile_s``); ``time_compiled`` then runs ``warmup`` untimed calls and timed repeats,
        each wrapped in ``jax.block_until_ready``. The repeat count adapts to a time budget:
        at least ``min_repeats``, at most ``max_repeats``, and no new repeat once the budget is
        spent. The result is the median and the interquartile range (max - min below 4 repeats).

Memory. ``compiled_memory`` reads ``compiled.memory_analysis()``: the bytes XLA assigned to the
        arguments, the outputs and the temporaries of one call (what the call needs on top of
        nothing else; available on CPU and GPU without running anything). ``device_peak_bytes``
        reads ``device.memory_stats()["peak_bytes_in_use"]`` where the backend keeps it (GPU):
        a process-wide high-water mark, so only meaningful when lengths are visited in
        increasing order.

FLOPs.  ``compiled.cost_analysis()["flops"]`` is XLA's count, but XLA counts the body of a
        ``while`` loop once, whatever its trip count, so for a variant built on ``lax.scan``
        (blockwise, chunked prefix sums) it undercounts by the number of iterations.
        ``jaxpr_flops`` walks the jaxpr instead, multiplying scan bodies by their length:
        2*M*N*K per ``dot_general`` plus one per output element of arithmetic primitives.
        ``count_flops`` uses XLA's number when the compiled program has no loop and the jaxpr
        count otherwise, and says which (``flops_source``).

Exponents. ``fit_loglog`` is the least-squares line through (log N, log y); ``parse_big_o``
        reads the exponent a variant claims ("O(N^2)" -> 2, "O(N w)" -> 1, "O(N sqrt N)" -> 1.5;
        log factors are counted apart). ``crossover`` finds the smallest measured N from which
        a variant beats a baseline at every larger measured N.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn import complexity

__all__ = [
    "Timing",
    "MemoryStats",
    "Fit",
    "Complexity",
    "Crossover",
    "compile_function",
    "trace_and_compile",
    "time_compiled",
    "time_function",
    "compiled_memory",
    "device_peak_bytes",
    "xla_flops",
    "jaxpr_flops",
    "has_loops",
    "count_flops",
    "matmul_rate",
    "block_matmul_rate",
    "fit_loglog",
    "parse_big_o",
    "crossover",
]


# ----------------------------------------------------------------------------- time


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall time of one call: median and spread over ``repeats`` timed calls, in seconds.

    ``spread_s`` is the interquartile range (``spread_kind="iqr"``) from 4 repeats on, the
    range max - min below that (``"range"``). ``compile_s`` is the lower + compile wall time,
    never part of the median.
    """

    median_s: float
    spread_s: float
    spread_kind: str
    min_s: float
    max_s: float
    repeats: int
    compile_s: float
    times_s: tuple[float, ...]


def compile_function(fn: Callable, *args: Any) -> tuple[Any, float]:
    """``jax.jit(fn).lower(*args).compile()`` and its wall time (trace + lower + compile) in seconds."""
    compiled, seconds, _ = trace_and_compile(fn, *args)
    return compiled, seconds


def trace_and_compile(fn: Callable, *args: Any) -> tuple[Any, float, Any]:
    """Like ``compile_function``, also returning the traced ``ClosedJaxpr`` (for ``count_flops``)."""
    t0 = time.perf_counter()
    traced = jax.jit(fn).trace(*args)
    compiled = traced.lower().compile()
    return compiled, time.perf_counter() - t0, traced.jaxpr


def _summary(times: Sequence[float], compile_s: float) -> Timing:
    ts = sorted(times)
    med = statistics.median(ts)
    if len(ts) >= 4:
        q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive")
        spread, kind = q3 - q1, "iqr"
    else:
        spread, kind = ts[-1] - ts[0], "range"
    return Timing(med, spread, kind, ts[0], ts[-1], len(ts), compile_s, tuple(times))


def time_compiled(
    compiled: Callable,
    *args: Any,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 50,
    budget_s: float = 1.0,
    compile_s: float = 0.0,
    stall_ratio: float = 1.5,
) -> Timing:
    """Time ``compiled(*args)``: ``warmup`` untimed calls, then adaptive timed repeats.

    Repeats continue while fewer than ``min_repeats`` are done, or while fewer than
    ``max_repeats`` are done and one more (as long as the slowest so far) still fits in
    ``budget_s`` of timed work. Then, while the median is over ``stall_ratio`` times the
    fastest call, more repeats follow (up to ``max_repeats``, whatever the budget): a
    long call on a shared machine can stall 2-5x in two of its three calls, and a median of
    three would then report the stall, not the kernel.
    """
    if min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"need 1 <= min_repeats <= max_repeats, got {min_repeats}, {max_repeats}")
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times: list[float] = []
    spent = 0.0

    def more() -> bool:
        if len(times) < min_repeats:
            return True
        fits = spent + max(times) <= budget_s
        stalled = statistics.median(times) > stall_ratio * min(times)
        return len(times) < max_repeats and (fits or stalled)

    while more():
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return _summary(times, compile_s)


def time_function(fn: Callable, *args: Any, **kwargs: Any) -> Timing:
    """Compile ``fn`` for ``args`` (timed apart), then ``time_compiled`` it."""
    compiled, compile_s = compile_function(fn, *args)
    return time_compiled(compiled, *args, compile_s=compile_s, **kwargs)


# ----------------------------------------------------------------------------- memory


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """Bytes XLA assigned for one call of a compiled program (``memory_analysis``).

    ``total_bytes = argument + output + temp - alias`` (aliased outputs reuse argument
    buffers). ``xla_peak_bytes`` is XLA's own peak estimate where this jax version reports one.
    """

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    total_bytes: int
    xla_peak_bytes: int | None


def compiled_memory(compiled: Any) -> MemoryStats | None:
    """``compiled.memory_analysis()`` as a ``MemoryStats``; None where the backend has none."""
    try:
        ma = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return None
    if ma is None:
        return None
    if isinstance(ma, (list, tuple)):  # some versions return one per device
        ma = ma[0]
    arg = int(ma.argument_size_in_bytes)
    out = int(ma.output_size_in_bytes)
    tmp = int(ma.temp_size_in_bytes)
    alias = int(getattr(ma, "alias_size_in_bytes", 0) or 0)
    peak = getattr(ma, "peak_memory_in_bytes", None)
    return MemoryStats(arg, out, tmp, alias, arg + out + tmp - alias, int(peak) if peak else None)


def device_peak_bytes(device: Any = None) -> int | None:
    """``peak_bytes_in_use`` of ``device.memory_stats()`` (GPU/TPU); None where not kept (CPU)."""
    device = device if device is not None else jax.devices()[0]
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if not stats:
        return None
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak is not None else None


# ----------------------------------------------------------------------------- FLOPs


def xla_flops(compiled: Any) -> float | None:
    """``compiled.cost_analysis()["flops"]``; None where the backend does not report it."""
    try:
        ca = compiled.cost_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    flops = float(ca["flops"])
    return flops if flops > 0 else None


def has_loops(compiled: Any) -> bool:
    """Whether the compiled program contains a ``while`` loop (XLA then undercounts FLOPs)."""
    try:
        text = compiled.as_text()
    except (NotImplementedError, AttributeError, RuntimeError):
        return True  # unknown: do not trust XLA's count
    return bool(re.search(r"\bwhile\(", text))


# Primitives counted as one FLOP per output element (transcendentals included, as XLA does).
_ELEMENTWISE = frozenset(
    """add sub mul div neg max min exp exp2 log log1p expm1 tanh logistic sqrt rsqrt cbrt pow
    integer_pow sin cos abs sign square erf erf_inv reduce_sum reduce_max reduce_min
    reduce_prod cumsum cumprod cummax cumlogsumexp atan2 rem select_n""".split()
)


def _size(aval: Any) -> int:
    return int(np.prod(getattr(aval, "shape", ()), dtype=np.int64))


def _sub_jaxprs(value: Any):
    """Jaxprs found in an equation parameter (Jaxpr, ClosedJaxpr or tuples of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _count(jaxpr: Any) -> tuple[float, bool]:
    """(FLOPs, exact) of a jaxpr.

    ``exact`` is False when a ``while`` loop's trip count is unknown (its body is counted once:
    too low for a loop of many trips, too high for one that often runs none) or a ``cond``'s
    branches differ in cost (the costliest is counted)."""
    total, exact = 0.0, True
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _rc), (lb, _rb) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            contract = int(np.prod([lhs[i] for i in lc], dtype=np.int64))
            total += 2.0 * contract * _size(eqn.outvars[0].aval)
            continue
        if name == "scan":
            inner, ok = _count(eqn.params["jaxpr"].jaxpr)
            total += eqn.params["length"] * inner
            exact &= ok
            continue
        if name == "while":
            body, _ = _count(eqn.params["body_jaxpr"].jaxpr)
            total += body  # trip count unknown: counted once
            exact = False
            continue
        if name == "cond":
            counts = [_count(b.jaxpr) for b in eqn.params["branches"]]
            total += max(c for c, _ in counts)
            exact &= all(ok for _, ok in counts) and len({c for c, _ in counts}) == 1
            continue
        # pjit, closed_call, remat, custom_jvp_call, custom_vjp_call...: the called jaxpr once
        # (a custom rule's other jaxprs are alternatives to it, not extra work).
        primary = [eqn.params[k] for k in ("call_jaxpr", "jaxpr", "fun_jaxpr") if k in eqn.params]
        subs = [j for v in (primary[:1] or list(eqn.params.values())) for j in _sub_jaxprs(v)]
        if subs:
            for j in subs:
                c, ok = _count(j)
                total += c
                exact &= ok
            continue
        if name in _ELEMENTWISE:
            # reductions work on every input element; the rest on every output element
            aval = eqn.invars[0].aval if name.startswith("reduce_") else eqn.outvars[0].aval
            total += _size(aval)
    return total, exact


def jaxpr_flops(fn: Callable, *args: Any) -> tuple[float, bool]:
    """FLOPs of ``fn(*args)`` counted on its jaxpr, scan bodies times their length.

    ``dot_general`` counts 2 * (contracted size) * (output size); arithmetic element-wise
    primitives and reductions count one per element. Returns ``(flops, exact)``; ``exact`` is
    False when a ``while`` loop (unknown trip count) was counted once or a ``cond``'s costliest
    branch stood for all of them.
    """
    closed = jax.make_jaxpr(fn)(*args)
    return _count(closed.jaxpr)


def count_flops(fn: Callable, args: Sequence[Any], compiled: Any, *, jaxpr: Any = None) -> dict[str, Any]:
    """FLOPs of one call, with their source.

    Returns ``flops``, ``flops_source`` ("xla": cost_analysis of a loop-free program;
    "jaxpr": the jaxpr count, used when XLA's is missing or the program loops, where XLA
    counts a loop body once; "jaxpr_inexact" when even the jaxpr had a while loop of unknown
    trip count or a cond whose branches differ in cost: neither an upper nor a lower bound),
    and both raw counts ``flops_xla`` and ``flops_jaxpr`` (the jaxpr is traced only when
    XLA's count cannot be used, so ``flops_jaxpr`` is None for loop-free programs). Pass the
    ``jaxpr`` from ``trace_and_compile`` to avoid tracing ``fn`` a second time.
    """
    fx = xla_flops(compiled)
    if fx is not None and not has_loops(compiled):
        return {"flops": fx, "flops_source": "xla", "flops_xla": fx, "flops_jaxpr": None}
    try:
        fj, exact = _count(jaxpr.jaxpr) if jaxpr is not None else jaxpr_flops(fn, *args)
    except Exception:  # noqa: BLE001 - an exotic primitive must not stop a measurement
        fj, exact = None, False
    if fj is not None:
        flops, source = fj, "jaxpr" if exact else "jaxpr_inexact"
    else:
        flops, source = fx, "xla_loop_body_once" if fx is not None else "none"
    return {"flops": flops, "flops_source": source, "flops_xla": fx, "flops_jaxpr": fj}


def matmul_rate(n: int = 2048, *, dtype=jnp.float32, budget_s: float = 1.0, min_repeats: int = 3) -> dict[str, float]:
    """This machine's dense matmul rate: an ``n x n @ n x n`` product, GFLOP/s of the median call."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    timing = time_function(jnp.matmul, a, b, warmup=1, min_repeats=min_repeats, max_repeats=20, budget_s=budget_s)
    flops = 2.0 * n**3
    return {
        "matmul_n": n,
        "matmul_median_s": timing.median_s,
        "matmul_gflops": flops / timing.median_s / 1e9,
        "matmul_best_gflops": flops / timing.min_s / 1e9,
    }


def block_matmul_rate(block: int = 64, count: int = 2048, *, dtype=jnp.float32, budget_s: float = 1.0,
                      min_repeats: int = 3) -> dict[str, float]:
    """The rate of ``count`` independent ``block x block @ block x block`` products in one batched
    call: the shape of the inner products of the chunked (linear, delta rule) and block-sparse
    engines. On CPU it sits far below ``matmul_rate``'s large square product, so it bounds the
    fraction of the matmul rate such an engine can reach with XLA's dot; the cost report gives both."""
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (count, block, block), dtype)
    b = jax.random.normal(kb, (count, block, block), dtype)
    timing = time_function(jnp.matmul, a, b, warmup=1, min_repeats=min_repeats, max_repeats=20, budget_s=budget_s)
    flops = 2.0 * count * block**3
    return {
        "block_matmul_shape": [count, block, block, block],
        "block_matmul_gflops": flops / timing.median_s / 1e9,
        "block_matmul_best_gflops": flops / timing.min_s / 1e9,
    }


# ----------------------------------------------------------------------------- exponents


@dataclasses.dataclass(frozen=True)
class Fit:
    """``log y = slope * log N + intercept`` by least squares; ``r2`` of the fit in log space."""

    slope: float
    intercept: float
    r2: float
    n_points: int

    def predict(self, n: float) -> float:
        return math.exp(self.intercept) * n**self.slope


def fit_loglog(ns: Sequence[float], ys: Sequence[float]) -> Fit | None:
    """Least-squares slope of log y on log N over the points with N, y > 0 (None below 2 points)."""
    pts = [(float(n), float(y)) for n, y in zip(ns, ys) if n and y and n > 0 and y > 0 and math.isfinite(y)]
    if len({n for n, _ in pts}) < 2:
        return None
    x = np.log([n for n, _ in pts])
    y = np.log([v for _, v in pts])
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    return Fit(float(slope), float(intercept), r2, len(pts))


@dataclasses.dataclass(frozen=True)
class Complexity:
    """A big-O claim in the sequence length: ``N^exponent * (log N)^log_power``."""

    exponent: float
    log_power: int = 0

    def slope_at(self, n: float) -> float:
        """The log-log slope this claim has at length ``n``: exponent + log_power / ln n."""
        return self.exponent + (self.log_power / math.log(n) if self.log_power and n > 1 else 0.0)

    def __str__(self) -> str:
        e = f"N^{self.exponent:g}" if self.exponent != 1 else "N"
        if self.exponent == 0:
            e = "1"
        return e + ("" if not self.log_power else f" log^{self.log_power} N" if self.log_power > 1 else " log N")


def parse_big_o(text: str) -> Complexity:
    """The exponent of the sequence length in a big-O string, read by ``efficient_attn.complexity``
    (one grammar for the cost tables and the scale test): "O(N^2)" -> 2, "O(N w)" -> 1,
    "O(N log N)" -> 1 with one log factor, "O(N sqrt(N b))" -> 1.5, "O(N b + (N/b)^2)" -> 2.
    Raises ``ValueError`` naming the claim and the accepted forms for a string it cannot read."""
    claim = complexity.parse_claim(text)
    return Complexity(claim.exponent, int(round(claim.log_power)))


@dataclasses.dataclass(frozen=True)
class Crossover:
    """Where a variant starts to win against a baseline, over the lengths both measured.

    ``n``: the smallest measured N from which the variant is better at every larger measured N
    (None if it is not better at the largest). ``n_interp``: the crossing of log(ratio) = 0
    interpolated linearly in log N between the last losing and the first winning length
    (equal to ``n`` when it wins from the first length, where ``from_start`` is True).
    ``ns``: the lengths compared.
    """

    n: int | None
    n_interp: float | None
    from_start: bool
    ns: tuple[int, ...]


def crossover(
    ns: Sequence[int],
    variant: Sequence[float],
    baseline: Sequence[float],
    *,
    variant_extra: Sequence[float] | None = None,
    baseline_extra: Sequence[float] | None = None,
) -> Crossover:
    """Crossover length of ``variant`` against ``baseline`` (lower is better, same lengths).

    With ``variant_extra``/``baseline_extra`` (e.g. memory beside time) a length counts as won
    only when the variant is lower on both. Lengths where either value is missing (None, NaN,
    <= 0) are left out.
    """
    n_ = len(ns)
    ve = variant_extra if variant_extra is not None else [1.0] * n_
    be = baseline_extra if baseline_extra is not None else [2.0] * n_
    pts = []
    for n, a, b, ax, bx in sorted(zip(ns, variant, baseline, ve, be)):
        vals = (a, b, ax, bx)
        if any(x is None or not math.isfinite(x) or x <= 0 for x in vals):
            continue
        pts.append((int(n), a, b, ax < bx))
    if not pts:
        return Crossover(None, None, False, ())
    won = [a < b and extra for _, a, b, extra in pts]
    ns_used = tuple(n for n, *_ in pts)
    if not won[-1]:
        return Crossover(None, None, False, ns_used)
    i = len(won) - 1
    while i > 0 and won[i - 1]:
        i -= 1
    if i == 0:
        return Crossover(pts[0][0], float(pts[0][0]), True, ns_used)
    (n0, a0, b0, _), (n1, a1, b1, _) = pts[i - 1], pts[i]
    r0, r1 = math.log(a0 / b0), math.log(a1 / b1)  # r0 >= 0 (lost on time, or on the extra), r1 < 0
    if r0 > r1 and r0 >= 0:
        frac = r0 / (r0 - r1)
        n_interp = math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0)))
    else:  # lost at n0 on the extra criterion only: the crossing is at n1
        n_interp = float(n1)
    return Crossover(n1, n_interp, False, ns_used)
