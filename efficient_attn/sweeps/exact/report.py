"""The kernel benchmark's outputs, rebuilt from its stored rows only.

``table.md``: per pass, the time of each implementation against N with blockwise's speed-ups
and its fraction of the matmul rate (each ratio from one row: the same interleaved rounds);
the compiled memory of forward+backward; causal against non-causal blockwise; the huge run.
``rows.json`` beside it holds the rows, the config and the environment the rows were
measured in (each row records its own; nothing of the rendering machine is written).
A config with peers gets the peers table instead (``peer_report``). Nothing is measured here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from efficient_attn import report
from efficient_attn.sweeps.exact import peer_report
from efficient_attn.sweeps.exact.config import IMPLS, PASSES, ExactConfig
from efficient_attn.sweeps.exact.units import MATMUL

__all__ = ["markdown", "write_outputs", "write_table_and_rows", "summary_line", "measured_environment"]

DPA, FULL, BW = IMPLS
_PASS_TITLE = {"fwd": "forward", "fwd_bwd": "forward + backward"}
GiB = 2**30
measured_environment = report.measured_environment


def _ok(rows: Sequence[dict], kind: str) -> list[dict]:
    return [r for r in rows if r.get("kind") == kind and r.get("status") == "ok"]


def _intro(rows: Sequence[dict], cfg: ExactConfig) -> str:
    env = measured_environment(rows)
    where = (f"Measured at commit {env.get('commit')} on {env.get('cpu')} ({env.get('cpu_cores')} cores, "
             f"{env.get('backend')}), jax {env.get('jax')}. ") if env else ""
    rates = [r[MATMUL]["gflops"] for r in _ok(rows, "time")]
    rate = (f"The f32 {cfg.matmul_n}^3 matmul, timed in the same rounds, ran at "
            f"{min(rates):.0f}-{max(rates):.0f} GFLOP/s. ") if rates else ""
    return (f"float32, B={cfg.batch}, H={cfg.heads}, D={cfg.head_dim}. {where}"
            f"Each row of a table is one run: the three implementations and the matmul compiled, warmed up "
            f"({cfg.warmup} call each), then timed in {cfg.repeats} interleaved rounds (one call of each per round, "
            f"inside `block_until_ready`); medians; compile time excluded. {rate}"
            "Speed-ups and fractions of the matmul rate compare programs of the same rounds.\n")


def _time_table(rows: list[dict]) -> str:
    body = []
    for r in sorted(rows, key=lambda r: r["n"]):
        t = {name: r["impls"][name]["median_s"] for name in IMPLS}
        body.append([r["n"], t[DPA] * 1e3, t[FULL] * 1e3, t[BW] * 1e3, t[DPA] / t[BW], t[FULL] / t[BW],
                     r["impls"][BW]["matmul_fraction"], r[MATMUL]["gflops"]])
    return report.markdown_table(
        ["N", "dot_product_attention ms", "full ms", "blockwise ms", "blockwise speed-up vs dpa", "vs full",
         "blockwise fraction of matmul rate", "matmul GFLOP/s (same rounds)"], body)


def markdown(rows: Sequence[dict], cfg: ExactConfig) -> str:
    if cfg.peers:
        return peer_report.markdown(rows, cfg)
    rows = [r for r in rows if r is not None]
    lines = ["# Exact attention: full, blockwise and jax.nn.dot_product_attention\n\n", _intro(rows, cfg)]
    times = _ok(rows, "time")
    for pass_name in PASSES:
        part = [r for r in times if r["pass"] == pass_name]
        if part:
            lines += [f"\n## {_PASS_TITLE[pass_name]}\n\n", _time_table(part)]
    mem = [[r["n"], name, report.to_mib(m["temp_bytes"]), report.to_mib(m["total_bytes"])]
           for r in _ok(rows, "memory") for name, m in r["impls"].items()]
    mem += [[r["n"], r["impl"], report.to_mib(r["temp_bytes"]), report.to_mib(r["total_bytes"])] for r in _ok(rows, "huge")]
    if mem:
        lines += ["\n## Compiled memory, forward + backward (compile only)\n\n",
                  report.markdown_table(["N", "impl", "temp MiB", "total MiB"], mem)]
    for r in _ok(rows, "causal"):
        c, nc = r["timings"]["causal"]["median_s"], r["timings"]["non_causal"]["median_s"]
        lines.append(f"\nCausal blockwise forward at N={r['n']}: {c * 1e3:.3g} ms against {nc * 1e3:.3g} ms "
                     f"non-causal ({nc / c:.2f}x; {cfg.repeats} interleaved rounds).\n")
    for r in _ok(rows, "huge"):
        total = "unknown" if r["total_bytes"] is None else f"{r['total_bytes'] / GiB:.2f} GiB"
        lines.append(f"\nblockwise forward + backward at N={r['n']} ran in {r['time_s']:.1f} s (one call; compile "
                     f"{r['compile_s']:.1f} s apart) with {total} compiled memory.\n")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["\n## Not measured\n\n",
                  report.markdown_table(["row", "N", "pass", "status", "reason"],
                                        [[r["kind"], r["n"], r["pass"], r.get("status"), r.get("reason")]
                                         for r in failed])]
    return "".join(lines)


def write_table_and_rows(out: Path, rows: Sequence[dict | None], cfg, render) -> None:
    """``out``/table.md (``render(rows, cfg)``) and ``out``/rows.json (rows, config, the rows'
    environment), from ``rows`` only: the writer of the kernel and the encoder benchmarks."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in rows if r is not None]
    report.write_atomic(out / "table.md", render(rows, cfg))
    report.write_json(out / "rows.json", {"environment": {**measured_environment(rows), "preset": cfg.preset},
                                          "config": dataclasses.asdict(cfg), "rows": rows})


def write_outputs(out: Path, rows: Sequence[dict], cfg: ExactConfig) -> None:
    """table.md and rows.json in ``out``, from ``rows`` only."""
    write_table_and_rows(out, rows, cfg, markdown)


def summary_line(row: dict) -> str:
    """One log line for a finished row."""
    if row["kind"] == "peers":
        return peer_report.summary_line(row)
    head = f"exact: N={row['n']:6d} {row['kind']:6s} {row['pass']:7s}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}: {row.get('reason')}"
    if row["kind"] == "time":
        t = {name: row["impls"][name]["median_s"] for name in IMPLS}
        return (f"{head} " + ", ".join(f"{name} {t[name] * 1e3:.1f} ms" for name in IMPLS)
                + f"; blockwise {t[DPA] / t[BW]:.2f}x dpa, {t[FULL] / t[BW]:.2f}x full, "
                f"{row['impls'][BW]['matmul_fraction']:.1%} of matmul ({row[MATMUL]['gflops']:.0f} GFLOP/s)")
    if row["kind"] == "memory":
        return f"{head} " + ", ".join(f"{name} temp {report.to_mib(m['temp_bytes']) or 0:.1f} MiB"
                                      for name, m in row["impls"].items())
    if row["kind"] == "causal":
        c, nc = row["timings"]["causal"]["median_s"], row["timings"]["non_causal"]["median_s"]
        return f"{head} blockwise causal {c * 1e3:.3g} ms, non-causal {nc * 1e3:.3g} ms ({nc / c:.2f}x)"
    return f"{head} blockwise one call {row['time_s']:.1f} s, total {report.to_mib(row['total_bytes']) or 0:.0f} MiB"
