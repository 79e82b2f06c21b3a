"""Exact attention, side by side: ``full``, ``blockwise`` and ``jax.nn.dot_product_attention``.

Everything is measured in ONE run on one machine and reported as ratios (float32, B=1, H=8,
D=64 by default):

- forward and forward+backward time at each N (median of repeats after warm-up, each repeat
  wrapped in ``jax.block_until_ready``; compile time excluded), and the fraction of this
  machine's matmul rate (f32 2048^3, measured in the same run) that each reaches;
- compiled temporary memory of forward+backward at ``--memory-n`` (compile only);
- causal against non-causal ``blockwise`` at ``--causal-n``;
- optionally (``--huge``) a real forward+backward run of ``blockwise`` at N=65536.

Writes ``results/exact/table.md`` and ``rows.json``.

    python experiments/bench_exact.py                 # about 2 minutes on 2 cores
    python experiments/bench_exact.py --huge          # adds N=65536 forward+backward (minutes)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import efficient_attn as ea
from efficient_attn import measure, report
from efficient_attn.ops.online_softmax import blockwise_attention
from efficient_attn.variants.full import full_attention


def _impls(causal: bool):
    mask = ea.Mask(causal=causal)
    return {
        "jax.nn.dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal),
        "full": lambda q, k, v: full_attention(q, k, v, mask),
        "blockwise": lambda q, k, v: blockwise_attention(q, k, v, causal=causal),
    }


def _fwd_bwd(f):
    def loss(q, k, v):
        return jnp.sum(f(q, k, v))

    return jax.grad(loss, argnums=(0, 1, 2))


def _inputs(n, b, h, d):
    ks = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(kk, (b, n, h, d), jnp.float32) for kk in ks]


def attention_flops(n: int, b: int, h: int, d: int, causal: bool = False, backward: bool = False) -> float:
    """Matmul FLOPs of exact attention: 2 matmuls of 2 n^2 d forward, 5 backward (recompute incl.)."""
    f = 4.0 * b * h * n * n * d
    if backward:
        f *= 3.5
    return f / 2 if causal else f


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-n", type=int, default=16384)
    p.add_argument("--causal-n", type=int, default=8192)
    p.add_argument("--huge", action="store_true", help="also run blockwise forward+backward at N=65536")
    p.add_argument("--out", type=Path, default=Path("results/exact"))
    args = p.parse_args(argv)
    b, h, d = args.batch, args.heads, args.head_dim
    rows = []

    def log(msg):
        print(msg, flush=True)

    rate = measure.matmul_rate()["matmul_gflops"] * 1e9
    log(f"matmul rate: {rate / 1e9:.0f} GFLOP/s (f32 2048^3, this run)")

    for n in args.lengths:
        q, k, v = _inputs(n, b, h, d)
        for pass_name, wrap in (("fwd", lambda f: f), ("fwd_bwd", _fwd_bwd)):
            times = {}
            for name, f in _impls(False).items():
                t = measure.time_function(wrap(f), q, k, v, min_repeats=args.repeats, max_repeats=args.repeats)
                times[name] = t.median_s
                flops = attention_flops(n, b, h, d, backward=pass_name == "fwd_bwd")
                rows.append(dict(kind="time", n=n, impl=name, pass_=pass_name, causal=False, time_s=t.median_s,
                                 time_min_s=t.min_s, time_max_s=t.max_s, compile_s=t.compile_s,
                                 gflops=flops / t.median_s / 1e9, matmul_fraction=flops / t.median_s / rate))
                log(f"N={n:6d} {pass_name:7s} {name:30s} {t.median_s * 1e3:9.1f} ms "
                    f"({flops / t.median_s / 1e9:6.1f} GFLOP/s, {flops / t.median_s / rate:5.1%} of matmul)")
            ratio = times["jax.nn.dot_product_attention"] / times["blockwise"]
            log(f"N={n:6d} {pass_name:7s} blockwise speed-up vs jax.nn.dot_product_attention: {ratio:.2f}x; "
                f"vs full: {times['full'] / times['blockwise']:.2f}x")

    # Memory of forward+backward at a long length: compile only.
    spec = jax.ShapeDtypeStruct((b, args.memory_n, h, d), jnp.float32)
    mem = {}
    for name, f in _impls(False).items():
        if name == "full":
            continue
        mem[name] = measure.compiled_memory(measure.compile_function(_fwd_bwd(f), spec, spec, spec)[0])
        rows.append(dict(kind="memory", n=args.memory_n, impl=name, pass_="fwd_bwd", causal=False,
                         temp_bytes=mem[name].temp_bytes, memory_bytes=mem[name].total_bytes))
    frac = mem["blockwise"].temp_bytes / mem["jax.nn.dot_product_attention"].temp_bytes
    log(f"N={args.memory_n}: fwd+bwd compiled temp memory: blockwise {mem['blockwise'].temp_bytes / 2**20:.1f} MiB, "
        f"jax.nn.dot_product_attention {mem['jax.nn.dot_product_attention'].temp_bytes / 2**20:.1f} MiB "
        f"({frac:.2%})")

    # Causal against non-causal blockwise.
    q, k, v = _inputs(args.causal_n, b, h, d)
    tc = {}
    for causal in (False, True):
        f = _impls(causal)["blockwise"]
        tc[causal] = measure.time_function(f, q, k, v, min_repeats=args.repeats, max_repeats=args.repeats).median_s
        rows.append(dict(kind="causal", n=args.causal_n, impl="blockwise", pass_="fwd", causal=causal, time_s=tc[causal]))
    log(f"N={args.causal_n}: blockwise causal {tc[True] * 1e3:.0f} ms vs non-causal {tc[False] * 1e3:.0f} ms: "
        f"{tc[False] / tc[True]:.2f}x")

    if args.huge:
        n = 65536
        q, k, v = _inputs(n, b, h, d)
        g, compile_s = measure.compile_function(_fwd_bwd(_impls(False)["blockwise"]), q, k, v)
        m = measure.compiled_memory(g)
        t0 = time.perf_counter()
        jax.block_until_ready(g(q, k, v))
        dt = time.perf_counter() - t0
        rows.append(dict(kind="huge", n=n, impl="blockwise", pass_="fwd_bwd", causal=False, time_s=dt,
                         temp_bytes=m.temp_bytes, memory_bytes=m.total_bytes))
        log(f"N={n}: blockwise fwd+bwd ran in {dt:.1f} s (compile {compile_s:.1f} s apart), compiled memory "
            f"{m.total_bytes / 2**30:.2f} GiB")

    _write(args.out, rows, rate)
    return 0


def _write(out: Path, rows, rate):
    env = report.environment("quick", matmul_gflops=rate / 1e9)
    report.write_json(out / "rows.json", {"environment": env, "rows": rows})
    by = {(r["n"], r["impl"], r["pass_"]): r for r in rows if r["kind"] == "time"}
    lines = ["# Exact attention: full, blockwise and jax.nn.dot_product_attention\n\n",
             f"float32, B/H/D as run, one run, {env['cpu']} ({env['cpu_cores']} cores), jax {env['jax']}, "
             f"commit {env['commit']}. Matmul rate measured in the same run: {rate / 1e9:.0f} GFLOP/s. "
             "Times are medians after warm-up; compile time excluded.\n"]
    ns = sorted({n for n, _, _ in by})
    for pass_name in ("fwd", "fwd_bwd"):
        table = []
        for n in ns:
            dpa = by[(n, "jax.nn.dot_product_attention", pass_name)]["time_s"]
            full = by[(n, "full", pass_name)]["time_s"]
            bw = by[(n, "blockwise", pass_name)]
            table.append([n, dpa * 1e3, full * 1e3, bw["time_s"] * 1e3, dpa / bw["time_s"], full / bw["time_s"],
                          bw["matmul_fraction"]])
        lines.append(f"\n## {'forward' if pass_name == 'fwd' else 'forward + backward'}\n\n")
        lines.append(report.markdown_table(
            ["N", "dot_product_attention ms", "full ms", "blockwise ms", "blockwise speed-up vs dpa",
             "vs full", "blockwise fraction of matmul rate"], table))
    mem_rows = [r for r in rows if r["kind"] in ("memory", "huge")]
    if mem_rows:
        lines.append("\n## Compiled memory, forward + backward (compile only)\n\n")
        lines.append(report.markdown_table(
            ["N", "impl", "temp MiB", "total MiB"],
            [[r["n"], r["impl"], r["temp_bytes"] / 2**20, r["memory_bytes"] / 2**20] for r in mem_rows]))
    t = {r["causal"]: r for r in rows if r["kind"] == "causal"}
    if len(t) == 2:
        lines.append(f"\nCausal blockwise forward at N={t[True]['n']}: {t[True]['time_s'] * 1e3:.0f} ms against "
                     f"{t[False]['time_s'] * 1e3:.0f} ms non-causal ({t[False]['time_s'] / t[True]['time_s']:.2f}x).\n")
    huge = [r for r in rows if r["kind"] == "huge"]
    for r in huge:
        lines.append(f"\nblockwise forward + backward at N={r['n']} ran in {r['time_s']:.1f} s with "
                     f"{r['memory_bytes'] / 2**30:.2f} GiB compiled memory.\n")
    report.write_atomic(out / "table.md", "".join(lines))


if __name__ == "__main__":
    sys.exit(main())
