"""efficient_attn.measure: exponent fits, the big-O parser, crossovers, timing, memory and FLOPs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn import measure


# ----------------------------------------------------------------------------- slope fit


def test_fit_recovers_exponent_of_noisy_power_law():
    rng = np.random.default_rng(0)
    ns = np.array([256, 512, 1024, 2048, 4096, 8192])
    ys = 3e-6 * ns**1.7 * np.exp(rng.normal(0.0, 0.03, ns.size))
    fit = measure.fit_loglog(ns, ys)
    assert fit is not None and fit.n_points == 6
    assert abs(fit.slope - 1.7) < 0.05
    assert fit.r2 > 0.99
    assert math.isclose(fit.predict(1024), 3e-6 * 1024**1.7, rel_tol=0.1)


def test_fit_is_exact_on_exact_data_and_ignores_unusable_points():
    ns = [64, 128, 256, 512, 1024]
    ys = [2.0 * n**2 for n in ns]
    fit = measure.fit_loglog(ns + [2048, 4096], ys + [None, 0.0])
    assert fit.n_points == 5
    assert fit.slope == pytest.approx(2.0, abs=1e-9)
    assert fit.intercept == pytest.approx(math.log(2.0), abs=1e-9)
    assert fit.r2 == pytest.approx(1.0)


def test_fit_needs_two_distinct_lengths():
    assert measure.fit_loglog([128], [1.0]) is None
    assert measure.fit_loglog([128, 128], [1.0, 2.0]) is None
    assert measure.fit_loglog([], []) is None


# ----------------------------------------------------------------------------- big-O parser


@pytest.mark.parametrize(
    "claim, exponent, logs",
    [
        ("O(N^2)", 2, 0),
        ("O(N)", 1, 0),
        ("O(N w)", 1, 0),
        ("O(N k)", 1, 0),
        ("O(N*k)", 1, 0),
        ("O(N log N)", 1, 1),
        ("O(N sqrt N)", 1.5, 0),
        ("O(N sqrt(N))", 1.5, 0),
        ("O(N^1.5)", 1.5, 0),
        ("O(T S)", 2, 0),
        ("O(N^2 d)", 2, 0),
        ("O(N^2 / b)", 2, 0),
        ("O(N / b)", 1, 0),
        ("O(N k + N d)", 1, 0),
        ("O(N^2 + N d)", 2, 0),
        ("O(N (log N)^2)", 1, 2),
        ("O(N b + (N/b)^2)", 2, 0),
        ("O(N b + N^2/b)", 2, 0),
        ("O(N m d + m^3)", 1, 0),
        ("O((N/c)^1.5)", 1.5, 0),
        ("O(N log(N))", 1, 1),
        ("O(N * (k + d))", 1, 0),
        ("O(N sqrt(N b))", 1.5, 0),
        ("O(N b (g + r + 3))", 1, 0),
        ("O(N log(N k))", 1, 1),
        ("O(1)", 0, 0),
        ("O(d^2)", 0, 0),
    ],
)
def test_parse_big_o(claim, exponent, logs):
    c = measure.parse_big_o(claim)
    assert c.exponent == pytest.approx(exponent)
    assert c.log_power == logs


@pytest.mark.parametrize("bad", ["N^2", "O()", "O(N + )", "O(N ? k)", "O((N + )^2)", "", None])
def test_parse_big_o_rejects_what_it_cannot_read(bad):
    with pytest.raises(ValueError):
        measure.parse_big_o(bad)


def test_log_factor_raises_the_local_slope():
    c = measure.parse_big_o("O(N log N)")
    assert c.slope_at(1024) == pytest.approx(1 + 1 / math.log(1024))
    assert measure.parse_big_o("O(N^2)").slope_at(1024) == 2


# ----------------------------------------------------------------------------- crossover


NS = [256, 512, 1024, 2048, 4096]


def test_crossover_after_losing_at_short_lengths():
    base = [1.0, 4.0, 16.0, 64.0, 256.0]  # quadratic
    var = [2.0, 8.0, 8.0, 16.0, 32.0]  # loses at 256 and 512, wins from 1024
    c = measure.crossover(NS, var, base)
    assert c.n == 1024 and not c.from_start
    assert 512 < c.n_interp < 1024
    # log(8/4) at 512, log(8/16) at 1024: the ratio crosses 1 half way in log N
    assert c.n_interp == pytest.approx(math.sqrt(512 * 1024), rel=1e-6)


def test_crossover_from_the_first_length_and_never():
    base = [4.0, 8.0, 16.0, 32.0, 64.0]
    assert measure.crossover(NS, [1.0] * 5, base) == measure.Crossover(256, 256.0, True, tuple(NS))
    never = measure.crossover(NS, [1, 2, 3, 4, 100.0], base)
    assert never.n is None and never.n_interp is None


def test_crossover_needs_a_win_at_every_longer_length():
    base = [10.0] * 5
    var = [5.0, 20.0, 5.0, 5.0, 5.0]  # wins at 256, loses at 512, then wins for good
    assert measure.crossover(NS, var, base).n == 1024


def test_crossover_with_a_second_criterion_and_missing_points():
    base_t, base_m = [10.0] * 5, [100.0] * 5
    var_t = [5.0] * 5  # always faster
    var_m = [200.0, 200.0, 50.0, 50.0, 50.0]  # less memory only from 1024
    c = measure.crossover(NS, var_t, base_t, variant_extra=var_m, baseline_extra=base_m)
    assert c.n == 1024 and c.n_interp == 1024.0
    # the baseline could not run at 4096: that length is left out, not counted as a win
    c2 = measure.crossover(NS, [20.0, 20.0, 20.0, 20.0, 1.0], [10.0, 10.0, 10.0, 10.0, None])
    assert c2.n is None and c2.ns == tuple(NS[:4])


# ----------------------------------------------------------------------------- timing


def test_timing_of_a_tiny_function_is_sane():
    x = jnp.ones((64, 64), jnp.float32)
    t = measure.time_function(lambda a: jnp.tanh(a @ a), x, warmup=1, min_repeats=3, max_repeats=7, budget_s=0.05)
    assert 3 <= t.repeats <= 7 and len(t.times_s) == t.repeats
    assert 0 < t.min_s <= t.median_s <= t.max_s < 1.0
    assert t.spread_s >= 0 and t.spread_kind in ("iqr", "range")
    assert t.compile_s > 0


def test_repeat_count_adapts_to_the_budget():
    x = jnp.ones((32, 32), jnp.float32)
    compiled, _ = measure.compile_function(lambda a: a @ a, x)
    no_guard = dict(stall_ratio=float("inf"))  # µs calls jitter past any ratio
    assert measure.time_compiled(compiled, x, min_repeats=2, max_repeats=50, budget_s=0.0, **no_guard).repeats == 2
    many = measure.time_compiled(compiled, x, min_repeats=2, max_repeats=12, budget_s=10.0)
    assert many.repeats == 12 and many.spread_kind == "iqr"
    with pytest.raises(ValueError):
        measure.time_compiled(compiled, x, min_repeats=3, max_repeats=2)


class _ScriptedClock:
    """A perf_counter that a fake compiled call advances by the next scripted duration."""

    def __init__(self, durations):
        self.now, self.durations = 0.0, list(durations)

    def perf_counter(self):
        return self.now

    def call(self, *args):
        self.now += self.durations.pop(0)
        return 0.0


@pytest.mark.parametrize("durations, repeats, median", [
    ([1.0, 4.0, 4.0, 1.0, 1.0], 5, 1.0),  # two of three stalled: two more calls, median of five
    ([1.0, 1.2, 1.1, 9.0, 9.0], 3, 1.1),  # steady: the budget's three, no more
    ([1.0, 4.0, 4.0, 4.0, 4.0, 1.0], 5, 4.0),  # still stalled at max_repeats: stops there
])
def test_repeats_continue_past_the_budget_while_calls_stall(monkeypatch, durations, repeats, median):
    clock = _ScriptedClock(durations)
    monkeypatch.setattr(measure, "time", clock)
    t = measure.time_compiled(clock.call, warmup=0, min_repeats=3, max_repeats=5, budget_s=0.0)
    assert t.repeats == repeats and t.median_s == pytest.approx(median)


def test_slower_work_takes_longer():
    small, big = jnp.ones((32, 32)), jnp.ones((256, 256))
    f = lambda a: a @ a @ a  # noqa: E731
    t_small = measure.time_function(f, small, min_repeats=5, max_repeats=5)
    t_big = measure.time_function(f, big, min_repeats=5, max_repeats=5)
    assert t_big.median_s > t_small.median_s


def test_block_matmul_rate_counts_every_block():
    r = measure.block_matmul_rate(8, 16, budget_s=0.05)
    assert r["block_matmul_shape"] == [16, 8, 8, 8]
    assert r["block_matmul_best_gflops"] >= r["block_matmul_gflops"] > 0


def test_matmul_rate_is_positive():
    r = measure.matmul_rate(128, budget_s=0.05)
    assert r["matmul_gflops"] > 0 and r["matmul_n"] == 128
    assert r["matmul_gflops"] == pytest.approx(2 * 128**3 / r["matmul_median_s"] / 1e9)


# ----------------------------------------------------------------------------- memory (compile only)


def _attention_like(q, k, v):
    w = jax.nn.softmax(q @ k.T / 8.0, axis=-1)  # [N, N] materialised
    return w @ v


def _memory(fn, n, d=16):
    spec = jax.ShapeDtypeStruct((n, d), jnp.float32)
    compiled, _ = measure.compile_function(fn, spec, spec, spec)
    return measure.compiled_memory(compiled)


def test_compiled_memory_grows_quadratically_for_a_quadratic_function():
    small, large = _memory(_attention_like, 512), _memory(_attention_like, 2048)
    assert small.total_bytes == small.argument_bytes + small.output_bytes + small.temp_bytes - small.alias_bytes
    assert small.argument_bytes == 3 * 512 * 16 * 4
    assert large.temp_bytes / small.temp_bytes > 10  # 16x for a [N, N] buffer
    assert large.total_bytes / small.total_bytes > 8


def test_compiled_memory_of_a_linear_function_grows_linearly():
    lin = lambda q, k, v: q * 2.0 + k * v  # noqa: E731
    small, large = _memory(lin, 512), _memory(lin, 2048)
    assert 3.5 < large.total_bytes / small.total_bytes < 4.5


def test_device_peak_is_none_or_bytes():
    peak = measure.device_peak_bytes()
    assert peak is None or (isinstance(peak, int) and peak >= 0)


# ----------------------------------------------------------------------------- FLOPs


def test_jaxpr_flops_counts_matmuls_and_multiplies_scan_bodies():
    a = jnp.ones((64, 32))
    b = jnp.ones((32, 16))
    flops, exact = measure.jaxpr_flops(lambda a, b: a @ b, a, b)
    assert exact and flops == 2 * 64 * 32 * 16

    m = jnp.ones((32, 32))

    def looped(x):
        y, _ = jax.lax.scan(lambda c, _: (c @ m, None), x, None, length=10)
        return y

    flops, exact = measure.jaxpr_flops(looped, m)
    assert exact and flops == 10 * 2 * 32**3


def test_jaxpr_flops_is_inexact_for_unknown_trip_counts_and_unequal_branches():
    m = jnp.ones((32, 32))

    def dynamic_loop(x, n):  # a trip count known only at run time becomes a while loop
        return jax.lax.fori_loop(0, n, lambda _, c: c @ m, x)

    flops, exact = measure.jaxpr_flops(dynamic_loop, m, jnp.int32(0))
    assert not exact and flops == pytest.approx(2 * 32**3, abs=8)  # counted once (+ the counter), though it runs no trip

    def unequal(x, p):
        return jax.lax.cond(p, lambda y: y @ m, lambda y: y, x)

    flops, exact = measure.jaxpr_flops(unequal, m, True)
    assert not exact and flops == 2 * 32**3  # the costliest branch stands for both

    def equal(x, p):
        return jax.lax.cond(p, lambda y: y @ m, lambda y: m @ y, x)

    flops, exact = measure.jaxpr_flops(equal, m, True)
    assert exact and flops == 2 * 32**3

    compiled, _ = measure.compile_function(dynamic_loop, m, jnp.int32(3))
    assert measure.count_flops(dynamic_loop, (m, jnp.int32(3)), compiled)["flops_source"] == "jaxpr_inexact"


def test_count_flops_uses_xla_without_loops_and_the_jaxpr_with_them():
    m = jnp.ones((64, 64))
    plain = lambda x: x @ x  # noqa: E731
    compiled, _ = measure.compile_function(plain, m)
    got = measure.count_flops(plain, (m,), compiled)
    assert got["flops_source"] == "xla"
    assert got["flops"] == pytest.approx(2 * 64**3, rel=0.05)

    def looped(x):
        y, _ = jax.lax.scan(lambda c, _: (c @ x, None), x, None, length=8)
        return y

    compiled, _ = measure.compile_function(looped, m)
    got = measure.count_flops(looped, (m,), compiled)
    assert measure.has_loops(compiled)
    assert got["flops_source"] == "jaxpr"
    assert got["flops"] == pytest.approx(8 * 2 * 64**3, rel=0.05)
    # XLA's own number counts the loop body once: far below the true count
    assert got["flops_xla"] is None or got["flops_xla"] < got["flops"] / 4


def test_count_flops_from_a_traced_jaxpr_matches_tracing_again():
    m = jnp.ones((32, 32))

    def looped(x):
        y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ x), None), x, None, length=4)
        return y

    compiled, seconds, jaxpr = measure.trace_and_compile(looped, m)
    assert seconds > 0
    assert measure.count_flops(looped, (m,), compiled, jaxpr=jaxpr) == measure.count_flops(looped, (m,), compiled)
