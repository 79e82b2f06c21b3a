"""Every complexity claim, measured at scale: compiled memory and FLOP growth up to N = 64K.

For every registered variant (plugins included), built at its defaults with max_len = 65536:

- memory: ``memory_analysis().temp_size_in_bytes`` of the compiled forward, and of the compiled
  forward+backward (the gradient of ``sum(out * w)`` with respect to q, k and v), must grow no
  faster than the memory claim: the log-log slope over each interval of lengths
  <= claimed slope + 0.15 (a claim is an upper bound; engines that work in fixed-size runs
  grow slower than it, which passes);
- time: FLOPs of the same two programs (XLA's ``cost_analysis`` for a loop-free program, the
  jaxpr count with scan bodies times their length otherwise: ``measure.count_flops``) must
  grow like the time claim: |slope - claimed slope| <= 0.15 between the two largest lengths,
  where the asymptote shows (a slope far below the claim is a wrong claim too).

The claimed slope is ``complexity.Claim.slope_between`` (a log factor gets its exact
allowance). A quadratic claim is skipped for that check (with the reason): it is the baseline
the subquadratic claims are measured against, not a claim of efficiency. Nothing is
executed: ``jax.jit(...).lower(...).compile()`` on shapes only, the module's state passed as
an argument (not folded into the program as constants). A variant that cannot attend
without a causal mask (``bidirectional=False``) is measured causal.

Two tiers. CI measures N = 8K, 32K (the slope 8K -> 32K); the ``slow`` tier measures 4K,
16K, 64K (slopes 16K -> 64K, the issue's definition). ``KNOWN`` lists the claims measured not
to hold, each as ``xfail(strict=True)`` with its measured slope, so a fix flips the test.

``python tests/conformance/test_scale.py [variant ...]`` prints the table of slopes and
compile times of the slow tier (one variant at a time).
"""

from __future__ import annotations

import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import efficient_attn as ea
from conformance.harness import VARIANTS, caps
from efficient_attn import measure
from efficient_attn.complexity import parse_claim

H, D, B = 2, 16, 1
MAX_LEN = 65536
TOLERANCE = 0.15
CI_LENGTHS = (8192, 32768)  # one interval, above where a quadratic term hides (~8K)
SLOW_LENGTHS = (4096, 16384, 65536)

# (variant, check, program, tier) -> the measured failure; None matches any program or tier.
# check: "memory" or "flops"; program: "fwd" or "fwd_bwd"; tier: "to32K" or "to64K".
KNOWN: dict[tuple[str, str, str | None, str | None], str] = {}


# ----------------------------------------------------------------------------- measuring


@functools.lru_cache(maxsize=None)
def _module(variant: str):
    return ea.build(variant, num_heads=H, head_dim=D, max_len=MAX_LEN, rngs=nnx.Rngs(0))


def _program(variant: str, backward: bool):
    """f(state, q, k, v, w): the attention output, or d sum(out * w) / d(q, k, v)."""
    graphdef, _ = nnx.split(_module(variant))
    mask = ea.Mask(causal=not caps(variant).bidirectional)

    def forward(state, q, k, v):
        return nnx.merge(graphdef, state, copy=True)(q, k, v, mask=mask)

    if not backward:
        return lambda state, q, k, v, w: forward(state, q, k, v)

    def loss(q, k, v, state, w):
        return jnp.sum(forward(state, q, k, v) * w)

    return lambda state, q, k, v, w: jax.grad(loss, argnums=(0, 1, 2))(q, k, v, state, w)


@functools.lru_cache(maxsize=None)
def measured(variant: str, n: int, backward: bool) -> dict:
    """Compile one program at length n (shapes only): temp bytes, FLOPs and their source, compile seconds."""
    _, state = nnx.split(_module(variant))
    state_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    x = jax.ShapeDtypeStruct((B, n, H, D), jnp.float32)
    args = (state_spec, x, x, x, x)
    fn = _program(variant, backward)
    t0, c0 = time.perf_counter(), time.process_time()
    traced = jax.jit(fn).trace(*args)
    compiled = traced.lower().compile()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    mem = measure.compiled_memory(compiled)
    flops = measure.count_flops(fn, args, compiled, jaxpr=traced.jaxpr)
    return {
        "temp_bytes": None if mem is None else mem.temp_bytes,
        "flops": flops["flops"],
        "flops_source": flops["flops_source"],
        "compile_s": seconds,
        "compile_cpu_s": cpu_seconds,
    }


def slope(variant: str, quantity: str, backward: bool, n_lo: int, n_hi: int) -> float:
    lo, hi = measured(variant, n_lo, backward)[quantity], measured(variant, n_hi, backward)[quantity]
    if not lo or not hi:
        pytest.fail(f"{variant}: no {quantity} reported at N={n_lo if not lo else n_hi} (got {lo}, {hi})")
    return math.log(hi / lo) / math.log(n_hi / n_lo)


# ----------------------------------------------------------------------------- the checks


TIERS = {"to32K": CI_LENGTHS, "to64K": SLOW_LENGTHS}


def _cases(check: str):
    """(variant, program, lengths) for every registered variant; the 64K tier slow, known failures xfail(strict)."""
    cases = []
    for tier, lengths in TIERS.items():
        for variant in VARIANTS:
            for program in ("fwd", "fwd_bwd"):
                keys = [(variant, check, p, t) for p in (program, None) for t in (tier, None)]
                reason = next((KNOWN[key] for key in keys if key in KNOWN), None)
                marks = [pytest.mark.slow] if lengths[-1] > CI_LENGTHS[-1] else []
                if reason:
                    marks.append(pytest.mark.xfail(strict=True, reason=reason))
                cases.append(pytest.param(variant, program, lengths, marks=marks, id=f"{variant}-{program}-{tier}"))
    return cases


def check_memory(variant: str, program: str, lengths) -> None:
    claim = parse_claim(caps(variant).memory)
    if not claim.subquadratic:
        pytest.skip(f"{variant} claims memory {claim.text}: quadratic, the baseline of this check")
    # the claim bounds memory at every scale: each interval is held to it, not only the last
    for n_lo, n_hi in zip(lengths, lengths[1:]):
        got = slope(variant, "temp_bytes", program == "fwd_bwd", n_lo, n_hi)
        allowed = claim.slope_between(n_lo, n_hi) + TOLERANCE
        assert got <= allowed, (
            f"{variant} claims memory {claim.text} but its {program} temp memory grew with slope {got:.2f} "
            f"from N={n_lo} to {n_hi} (allowed <= {allowed:.2f})"
        )


def check_flops(variant: str, program: str, lengths) -> None:
    claim = parse_claim(caps(variant).time)
    if not claim.subquadratic:
        pytest.skip(f"{variant} claims time {claim.text}: quadratic, the baseline of this check")
    n_lo, n_hi = lengths[-2], lengths[-1]
    backward = program == "fwd_bwd"
    got = slope(variant, "flops", backward, n_lo, n_hi)
    want = claim.slope_between(n_lo, n_hi)
    source = measured(variant, n_hi, backward)["flops_source"]
    assert abs(got - want) <= TOLERANCE, (
        f"{variant} claims time {claim.text} (slope {want:.2f}) but its {program} FLOPs ({source}) grew with "
        f"slope {got:.2f} from N={n_lo} to {n_hi}"
    )


@pytest.mark.parametrize("variant, program, lengths", _cases("memory"))
def test_memory_slope_within_claim(variant, program, lengths):
    check_memory(variant, program, lengths)


@pytest.mark.parametrize("variant, program, lengths", _cases("flops"))
def test_flop_slope_matches_claim(variant, program, lengths):
    check_flops(variant, program, lengths)


# ----------------------------------------------------------------------------- the table


def table(variants, lengths=SLOW_LENGTHS) -> None:
    n_lo, n_hi = lengths[-2], lengths[-1]
    print(f"slopes {n_lo} -> {n_hi}; compile seconds at {n_hi} (fwd, fwd+bwd)")
    print("variant | mem fwd | mem fwd+bwd | flops fwd | flops fwd+bwd | claimed mem | claimed time | flops source | compile s")
    for v in variants:
        c = caps(v)
        mem, tim = parse_claim(c.memory), parse_claim(c.time)
        row = [v]
        if not (mem.subquadratic or tim.subquadratic):
            print(f"{v} | skipped: claims memory {c.memory}, time {c.time}", flush=True)
            continue
        for quantity in ("temp_bytes", "flops"):
            for backward in (False, True):
                for n in lengths:
                    measured(v, n, backward)
                row.append(f"{slope(v, quantity, backward, n_lo, n_hi):.2f}")
        source = measured(v, n_hi, True)["flops_source"]
        secs = "/".join(f"{measured(v, n_hi, b)['compile_s']:.1f}" for b in (False, True))
        row += [f"{c.memory} ({mem.slope_between(n_lo, n_hi):.2f})", f"{c.time} ({tim.slope_between(n_lo, n_hi):.2f})",
                source, secs]
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    table(sys.argv[1:] or VARIANTS)
