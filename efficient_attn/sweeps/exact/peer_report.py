"""The peers preset's table.md, rebuilt from its stored peers rows only (nothing measured).

Per (mask, pass): each implementation's time against N, the best peer of the row, blockwise's
speed-up over it and blockwise's fraction of the matmul rate measured in the same rounds; then
each implementation's agreement with ``full``, the settings every peer ran with, the peers not
installed, and the cells not timed with their reasons.
"""

from __future__ import annotations

from typing import Sequence

from efficient_attn import report
from efficient_attn.sweeps.exact.config import PASSES, PEER_BASELINES, ExactConfig

__all__ = ["markdown", "summary_line", "best_peer"]

BW = PEER_BASELINES[0]
MATMUL = "matmul"
_PASS_TITLE = {"fwd": "forward", "fwd_bwd": "forward + backward"}
_NOT_TIMED = {"missing": "not installed", "error": "error", "unsupported": "no causal mode",
              "over_budget": "over budget"}


def _mask(causal: bool) -> str:
    return "causal" if causal else "non-causal"


def _ok(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind") == "peers" and r.get("status") == "ok"]


def best_peer(row: dict) -> tuple[str, float] | None:
    """(name, median s) of the fastest implementation of the row other than blockwise."""
    timed = [(c["median_s"], name) for name, c in row["impls"].items() if name != BW and c.get("status") == "ok"]
    return None if not timed else min(timed)[::-1]


def _intro(rows: Sequence[dict], cfg: ExactConfig) -> str:
    env = report.measured_environment(rows)
    where = (f"Measured at commit {env.get('commit')} on {env.get('cpu')} ({env.get('cpu_cores')} cores, "
             f"{env.get('backend')}), jax {env.get('jax')}. ") if env else ""
    rates = [r[MATMUL]["gflops"] for r in _ok(rows)]
    rate = (f"The f32 {cfg.matmul_n}^3 matmul, timed in the same rounds, ran at "
            f"{min(rates):.0f}-{max(rates):.0f} GFLOP/s. ") if rates else ""
    budget = ("" if cfg.peer_call_budget_s is None else
              f" A peer whose checked call took over {cfg.peer_call_budget_s:g} s is not timed in that cell.")
    rounds = f"{cfg.repeats} interleaved round(s)"
    if cfg.peer_one_round_from_n is not None:
        rounds += f" (one round from N = {cfg.peer_one_round_from_n}, where a call takes seconds)"
    return (f"float32, B={cfg.batch}, H={cfg.heads}, D={cfg.head_dim}. {where}"
            f"Each row of a table is one run: blockwise, jax.nn.dot_product_attention and every installed peer, with "
            f"the matmul, compiled, then timed in {rounds} (one call of each per round, "
            f"inside `block_until_ready`, each timed call right after {cfg.peer_settle} untimed call(s) of the same "
            f"program, {cfg.warmup} warm-up call(s) before the first round); medians; compile time excluded. {rate}"
            "Each program's first untimed call is checked against `full` on the row's own inputs (the output; for "
            "forward + backward the output and the gradients of sum(out)): a peer that differs by more than the "
            f"row's tolerance is recorded as an error and not timed.{budget} `full` is the reference only, not timed "
            "here (it is in the quick table, results/exact/table.md). Causal rows count the FLOPs of the visible half "
            "of the scores, so an implementation that computes the masked half too shows a lower rate. Speed-ups "
            "and fractions of the matmul rate compare programs of the same rounds.\n")


def _cell(c: dict) -> float | str:
    return c["median_s"] * 1e3 if c.get("status") == "ok" else _NOT_TIMED.get(c.get("status"), str(c.get("status")))


def _time_table(rows: list[dict], names: list[str]) -> str:
    body = []
    for r in sorted(rows, key=lambda r: r["n"]):
        best = best_peer(r)
        bw = r["impls"][BW]
        body.append([r["n"], *[_cell(r["impls"][name]) for name in names],
                     best[0] if best else None, best[1] / bw["median_s"] if best else None, bw["matmul_fraction"],
                     r[MATMUL]["gflops"]])
    return report.markdown_table(["N", *[f"{name} ms" for name in names], "best peer", "blockwise speed-up vs best peer",
                                  "blockwise fraction of matmul rate", "matmul GFLOP/s (same rounds)"], body)


def _agreement(rows: list[dict], names: list[str]) -> str:
    body = [[_mask(r["causal"]), r["pass"], r["n"], *[r["impls"][name].get("max_abs_err") for name in names]]
            for r in rows]
    return report.markdown_table(["mask", "pass", "N", *names], body)


def _notes(rows: list[dict], names: list[str]) -> list[str]:
    lines = []
    settings = {name: c["settings"] for r in rows for name, c in r["impls"].items() if c.get("settings")}
    if settings:
        lines += ["\n## Settings\n\n", *[f"- {name}: {settings[name]}\n" for name in names if name in settings]]
    missing = {name: c["reason"] for r in rows for name, c in r["impls"].items() if c.get("status") == "missing"}
    if missing:
        lines += ["\n## Peers not installed\n\n", *[f"- {name}: {reason}\n" for name, reason in missing.items()]]
    skipped = [[_mask(r["causal"]), r["pass"], r["n"], name, _NOT_TIMED.get(c["status"], c["status"]), c.get("reason")]
               for r in rows for name, c in r["impls"].items() if c.get("status") not in ("ok", "missing")]
    if skipped:
        lines += ["\n## Cells not timed\n\n", report.markdown_table(["mask", "pass", "N", "impl", "status", "reason"],
                                                                   skipped)]
    return lines


def markdown(rows: Sequence[dict], cfg: ExactConfig) -> str:
    rows = [r for r in rows if r is not None]
    ok = _ok(rows)
    names = list(dict.fromkeys(name for r in ok for name in r["impls"])) or [*PEER_BASELINES, *cfg.peers]
    lines = ["# Exact attention against the JAX peers\n\n", _intro(rows, cfg)]
    for causal in cfg.peer_causal:
        for pass_name in PASSES:
            part = [r for r in ok if r["causal"] == causal and r["pass"] == pass_name]
            if part:
                lines += [f"\n## {_PASS_TITLE[pass_name]}, {_mask(causal)}\n\n", _time_table(part, names)]
    if ok:
        tol = ", ".join(f"{t:g}" for t in dict.fromkeys(r["atol"] for r in ok))
        lines += [f"\n## Agreement with full (max abs error of the checked call; tolerance {tol})\n\n",
                  _agreement(ok, names)]
    lines += _notes(ok, names)
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["\n## Not measured\n\n",
                  report.markdown_table(["row", "mask", "N", "pass", "status", "reason"],
                                        [[r["kind"], _mask(r.get("causal")), r["n"], r["pass"], r.get("status"),
                                          r.get("reason")] for r in failed])]
    return "".join(lines)


def summary_line(row: dict) -> str:
    """One log line for a finished peers row."""
    head = f"exact: N={row['n']:6d} peers  {row['pass']:7s} {_mask(row.get('causal')):10s}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}: {row.get('reason')}"
    bw, best = row["impls"][BW], best_peer(row)
    vs = f", best peer {best[0]} {best[1] * 1e3:.1f} ms ({best[1] / bw['median_s']:.2f}x)" if best else ", no peer timed"
    untimed = [f"{name} ({_NOT_TIMED.get(c['status'], c['status'])})" for name, c in row["impls"].items()
               if c.get("status") != "ok"]
    return (f"{head} blockwise {bw['median_s'] * 1e3:.1f} ms{vs}, {bw['matmul_fraction']:.1%} of matmul"
            + (f"; not timed: {', '.join(untimed)}" if untimed else ""))
