"""The accuracy experiment's outputs, rebuilt from the stored rows only (nothing is trained here).

``table.md``: variants x tasks, mean ± sample std over seeds, LRA's published Table 1 beside
ours where the task matches (a task whose rows hold per-group scores, MQAR's pair counts,
shows its hardest group there and every group in a table of its own); the settings;
throughput; notes (cells n/a with the reason, cells not run yet counted, errors, the sanity
expectations, where the Pareto plot's costs come from); the environment. ``rows.csv`` and
``rows.json`` (config, environment, curves), and the plots of ``plots.py``. Re-rendering the
same rows gives the same table, apart from the environment's commit stamp.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from efficient_attn import report as ea_report
from efficient_attn.registry import get_spec, list_variants
from efficient_attn.sweeps.accuracy.config import TASK_TITLES, AccuracyConfig, current_rows
from efficient_attn.sweeps.accuracy.plots import load_cost, plot_curves, plot_pareto
from efficient_attn.sweeps.accuracy.published import PUBLISHED_TABLE1, PUBLISHED_TASKS

__all__ = ["CSV_COLUMNS", "SANITY_DEFAULTS", "markdown", "reference_variant", "write_outputs"]

# least test accuracy of the reference variant, per task, unless a preset states its own
# (AccuracyConfig.sanity); ListOps without a stated one: 10 points above the majority class
SANITY_DEFAULTS = {"mqar": 0.99, "selective_copy": 0.95}

CSV_COLUMNS = [
    "variant", "task", "seed", "status", "reason", "metric", "test", "test_accuracy", "test_loss", "best_val",
    "best_step", "steps", "wall_s", "compile_s", "tokens_per_s", "num_params", "seq_len", "causal", "kv_mask_used",
    "family", "exact", "fingerprint", "cpu_s",
]


def reference_variant() -> str | None:
    """The registry's exact reference, whose rows the sanity expectations check: the exact
    variant whose registration names a faster exact twin (``full`` -> ``blockwise``)."""
    for name in list_variants():
        spec = get_spec(name)
        if spec.capabilities.exact and spec.fast_exact:
            return name
    return None


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    a = np.asarray(values, float)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def _cell(values: list[float], scale: float, digits: int) -> str:
    if not values:
        return "-"
    m, s = _mean_std([v * scale for v in values])
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def _group_name(task: str, by) -> str | None:
    """The grouping the task's rows report (e.g. "pairs"), or None."""
    for (v, t), rs in by.items():
        for r in rs:
            if t == task and r.get("status") == "ok" and r.get("groups"):
                return r["groups"]["name"]
    return None


def _groups_of(task: str, by) -> list[int]:
    """Every group key reported by the task's ok rows, ascending."""
    keys = {int(g) for (v, t), rs in by.items() if t == task for r in rs
            if r.get("status") == "ok" and r.get("groups") for g in r["groups"]["test"]}
    return sorted(keys)


def _headline(r: dict, hardest: int | None) -> float:
    """The row's value in the main table: its hardest group's accuracy where the task is grouped."""
    if hardest is not None and r.get("groups") and str(hardest) in r["groups"]["test"]:
        return float(r["groups"]["test"][str(hardest)])
    return float(r["test"])


def _metric_of(task: str, by) -> str:
    for (v, t), rs in by.items():
        if t == task and rs:
            return rs[0].get("metric", "accuracy")
    return "bits_per_byte" if task == "bytes_lm" else "accuracy"


def markdown(rows: Sequence[dict], cfg: AccuracyConfig, skipped: dict, env: dict, cost_note: str) -> str:
    """``table.md`` from the stored rows, the skip reasons and the environment."""
    by = current_rows(rows, cfg)
    variants = sorted({v for v, _ in by} | {v for v, _ in skipped} | set(cfg.variant_names()))
    tasks = [t.task for t in cfg.tasks]
    acc_tasks = [t.task for t in cfg.tasks if _metric_of(t.task, by) != "bits_per_byte"]
    hardest = {t: (_groups_of(t, by)[-1] if _group_name(t, by) else None) for t in tasks}
    headers = ["variant"]
    for t in tasks:
        unit = "bits/byte ↓" if _metric_of(t, by) == "bits_per_byte" else "acc %"
        at = f" {_group_name(t, by)}={hardest[t]}" if hardest[t] is not None else ""
        headers.append(f"{TASK_TITLES.get(t, t)}{at} ({unit})")
        if t in PUBLISHED_TASKS:
            headers.append(f"{TASK_TITLES[t]} LRA")
    headers += ["avg acc %", "seeds"]
    notes: list[str] = []
    body = []
    for v in variants:
        line = [v]
        means = []
        nseeds = set()
        for setting in cfg.tasks:
            t = setting.task
            rs = by.get((v, t), [])
            ok = [r for r in rs if r["status"] == "ok"]
            err = [r for r in rs if r["status"] != "ok"]
            reason = skipped.get((v, t))
            if ok:
                bpb = ok[0]["metric"] == "bits_per_byte"
                values = [_headline(r, hardest[t]) for r in ok]
                line.append(_cell(values, 1.0 if bpb else 100.0, 3 if bpb else 1))
                nseeds.add(len(ok))
                if not bpb:
                    means.append(100.0 * float(np.mean(values)))
                if err:
                    notes.append(f"{v} on {t}: {len(err)} seed(s) failed: {err[0]['reason']}")
            elif reason:
                line.append(f"n/a [{len(notes) + 1}]")
                notes.append(f"{v} on {t}: n/a: {reason}")
            elif err:
                line.append(f"error [{len(notes) + 1}]")
                notes.append(f"{v} on {t}: error: {err[0]['reason']}")
            else:
                line.append("-")
            if t in PUBLISHED_TASKS:
                pub = PUBLISHED_TABLE1.get(v)
                line.append(f"{pub[1][t]:.2f}" if pub else "-")
        line.append(f"{np.mean(means):.1f}" if means and len(means) == len(acc_tasks) else "-")
        line.append("/".join(str(n) for n in sorted(nseeds)) or "-")
        body.append(line)

    lines = [f"# Accuracy ({cfg.preset} preset)", ""]
    lines.append(
        "Test score of the best-validation checkpoint, mean ± sample std over seeds (one seed: the value). "
        "Accuracy in %; bytes_lm in bits per byte (lower is better). Every variant trains the same model "
        "with only the attention core changed. 'LRA' columns: Tay et al. 2020, Table 1, as published "
        "(single runs, at LRA's lengths and model sizes, not ours: compare orderings, not values). "
        "'avg acc' averages the accuracy tasks when all ran."
    )
    lines.append("")
    lines.append(ea_report.markdown_table(headers, body))
    lines += _progress(by, cfg, skipped)
    for t in tasks:
        if hardest[t] is not None:
            lines += _group_table(by, t, variants)
    lines += _settings(cfg)
    lines += _throughput(by, cfg, variants)
    lines += ["## Notes", ""]
    lines += _sanity_notes(by, cfg)
    lines += [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    lines += _exact_at_length(cfg, variants)
    lines.append(f"- Pareto plot: {cost_note}")
    lines.append("")
    lines.append(f"Environment: jax {env.get('jax')}, flax {env.get('flax')}, {env.get('backend')} "
                 f"({env.get('device')}, {env.get('cpu')}, {env.get('cpu_cores')} cores), commit {env.get('commit')}.")
    return "\n".join(lines) + "\n"


def _covers(value, limit) -> bool:
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and isinstance(value, (int, float)):
        return value >= limit
    return value == limit


def _exact_at_length(cfg: AccuracyConfig, variants: list[str]) -> list[str]:
    """Variants whose hyperparameters in this sweep meet their declared exact limit at a task's
    length (``exact_limit``): there they compute full attention by another kernel."""
    out = []
    for v in variants:
        try:
            spec = get_spec(v)
        except ValueError:
            continue
        if spec.exact_limit is None or spec.capabilities.exact:
            continue
        setting = {f.name: f.default for f in dataclasses.fields(spec.config)} | dict(cfg.kwargs_for(v))
        lengths = sorted({s.seq_len for s in cfg.tasks
                          if all(_covers(setting.get(k), x) for k, x in spec.exact_limit(s.seq_len).items())})
        if lengths:
            out.append(f"{v} at N={', '.join(map(str, lengths))}")
    if not out:
        return []
    return [f"- At their hyperparameters here, these variants meet their declared exact limit (they equal full "
            f"attention) at the task lengths named, so those cells measure full attention through another kernel: "
            + "; ".join(out) + "."]


def _progress(by, cfg: AccuracyConfig, skipped: dict) -> list[str]:
    """How many runs of this config are done, and which cells are not run yet (never left
    silently blank); nothing when the table is complete."""
    seeds = set(cfg.seeds)
    cells, missing, runs_done = 0, [], 0
    for v in cfg.variant_names():
        for s in cfg.tasks:
            if (v, s.task) in skipped:
                continue
            cells += 1
            done = {r["seed"] for r in by.get((v, s.task), []) if r["status"] == "ok"} & seeds
            runs_done += len(done)
            if len(done) < len(seeds):
                missing.append(f"{v}/{s.task} ({len(done)}/{len(seeds)})")
    if not missing:
        return []
    return [f"Not finished: {len(missing)} of {cells} cells (variant, task; n/a cells not counted) have fewer than "
            f"{len(seeds)} seeds; {runs_done} of {cells * len(seeds)} runs are done; the same command resumes the "
            f"rest. Cells with a value and fewer seeds show them in 'seeds'; '-' means not run yet. Pending: "
            + ", ".join(missing) + ".", ""]


def _group_table(by, task: str, variants: list[str]) -> list[str]:
    """The task's test accuracy per group (MQAR: per pair count), mean ± std over seeds."""
    name, keys = _group_name(task, by), _groups_of(task, by)
    body = []
    for v in variants:
        ok = [r for r in by.get((v, task), []) if r["status"] == "ok" and r.get("groups")]
        if ok:
            body.append([v] + [_cell([r["groups"]["test"][str(g)] for r in ok if str(g) in r["groups"]["test"]],
                                     100.0, 1) for g in keys] + [str(len(ok))])
    title = TASK_TITLES.get(task, task)
    return [f"## {title}: test accuracy (%) per {name} count", "",
            ea_report.markdown_table(["variant"] + [f"{name}={g}" for g in keys] + ["seeds"], body),
            f"Each test row has one {name} count (equal shares); the main table shows {name}={keys[-1]}.", ""]


def _settings(cfg: AccuracyConfig) -> list[str]:
    lines = ["## Settings", ""]
    set_rows = []
    for s in cfg.tasks:
        m, tr = s.model, s.train
        set_rows.append([s.task, s.seq_len, f"{s.num_train}/{s.num_val}/{s.num_test}",
                         f"{m.num_layers}x{m.emb_dim}, {m.num_heads} heads, MLP {m.mlp_dim}"
                         + (f", {m.pool}" if s.task in ("listops", "pathfinder") else "")
                         + f", {m.position} positions"
                         + (f", short conv {m.short_conv}" if m.short_conv else ""),
                         f"{tr.steps} x {tr.batch_size}", f"{tr.lr:g} {tr.schedule}, warm-up {tr.warmup}",
                         ", ".join(f"{k}={v}" for k, v in s.params) or "defaults"])
    lines.append(ea_report.markdown_table(["task", "length", "train/val/test", "model", "steps x batch", "lr",
                                           "generator"], set_rows))
    kw = ", ".join(f"{v}: " + ", ".join(f"{k}={x}" for k, x in p) for v, p in cfg.variant_kwargs)
    lines.append(f"Seeds {list(cfg.seeds)} (model init and data order; data seed {cfg.data_seed}). Variant "
                 f"hyperparameters: registered defaults (LRA's){'; overrides: ' + kw if kw else ''}.")
    lines.append("")
    return lines


def _throughput(by, cfg: AccuracyConfig, variants: list[str]) -> list[str]:
    lines = ["## Throughput and time", ""]
    tp_rows = []
    for v in variants:
        line = [v]
        for s in cfg.tasks:
            ok = [r for r in by.get((v, s.task), []) if r["status"] == "ok"]
            cpu = [r["cpu_s"] for r in ok if r.get("cpu_s") is not None]
            line.append(f"{np.mean([r['tokens_per_s'] for r in ok]) / 1e3:.0f}k / {np.mean([r['wall_s'] for r in ok]):.0f} s"
                        + (f" / cpu {np.mean(cpu):.0f} s" if cpu else "") if ok else "-")
        tp_rows.append(line)
    lines.append(ea_report.markdown_table(["variant"] + [f"{TASK_TITLES.get(s.task, s.task)} tok/s / wall"
                                                         for s in cfg.tasks], tp_rows))
    lines.append("Training tokens (batch x length) per second, compile excluded; wall = compile + train + eval; "
                 "cpu = CPU seconds of the run's process, all threads (where recorded).")
    loaded = [r for rs in by.values() for r in rs if r.get("status") == "ok" and r.get("load_1min") is not None]
    shared = [r for r in loaded if r["load_1min"] > (r.get("cores") or 1)]
    if shared:
        lines.append(f"Contended: {len(shared)} of {len(loaded)} runs ended with the 1-minute load average above the "
                     f"core count (up to {max(r['load_1min'] for r in shared):.1f}), i.e. other processes shared the "
                     "CPU: their tok/s and wall times are inflated and rank nothing; cpu seconds are not inflated "
                     "by waiting, though shared caches still slow them.")
    lines.append("")
    return lines


def _sanity_notes(by, cfg: AccuracyConfig) -> list[str]:
    """The expectations a correct pipeline should meet, stated up front and checked (not tuned to),
    on the rows of the registry's exact reference; a task without its rows yet says so."""
    out = ["Sanity expectations (stated before the runs and checked here, not tuned to; where a setting was "
           "changed after a miss, the line says so):"]
    ref = reference_variant()
    least = dict(SANITY_DEFAULTS, **dict(cfg.sanity))

    def ref_rows(task):
        return [r for r in by.get((ref, task), []) if r["status"] == "ok"]

    def verdict(holds):
        return "holds" if holds else "does NOT hold"

    def pending(text):
        out.append(f"- {text}: not run yet")

    settings = {s.task: s for s in cfg.tasks} if ref is not None else {}
    if "mqar" in settings:
        rs, setting = ref_rows("mqar"), settings["mqar"]
        params = ", ".join(f"{k}={v}" for k, v in setting.params)
        keys = _groups_of("mqar", by)
        where = f" on its hardest {_group_name('mqar', by)} count ({keys[-1]})" if keys and _group_name("mqar", by) else ""
        text = (f"{ref} attention solves MQAR (Zoology: attention solves it at every length) at length "
                f"{setting.seq_len} ({params or 'generator defaults'}){where}")
        if rs:
            acc = float(np.mean([_headline(r, keys[-1] if keys else None) for r in rs]))
            out.append(f"- {text}: {100 * acc:.1f}% -> {verdict(acc >= least['mqar'])} "
                       f"(threshold {100 * least['mqar']:g}%)")
        else:
            pending(f"{text} (threshold {100 * least['mqar']:g}%)")
        out += [f"  {text}" for task, text in cfg.task_notes if task == "mqar"]
    if "selective_copy" in settings:
        rs, setting = ref_rows("selective_copy"), settings["selective_copy"]
        params = ", ".join(f"{k}={v}" for k, v in setting.params)
        text = (f"{ref} attention solves selective copying (MAD: attention solves it) at length {setting.seq_len} "
                f"({params or 'generator defaults'})")
        if rs:
            acc = float(np.mean([r["test"] for r in rs]))
            out.append(f"- {text}: {100 * acc:.1f}% -> {verdict(acc >= least['selective_copy'])} "
                       f"(threshold {100 * least['selective_copy']:g}%)")
        else:
            pending(f"{text} (threshold {100 * least['selective_copy']:g}%)")
        out += [f"  {text}" for task, text in cfg.task_notes if task == "selective_copy"]
    if "listops" in settings:
        rs = ref_rows("listops")
        if "listops" in dict(cfg.sanity):
            text = f"{ref} learns ListOps (small models: 36-39% when they train, 16-20% when they collapse)"
            if rs:
                acc = float(np.mean([r["test"] for r in rs]))
                collapse = " (a collapse)" if acc <= 0.20 else ""
                out.append(f"- {text}: {100 * acc:.1f}%{collapse} -> {verdict(acc >= least['listops'])} "
                           f"(threshold {100 * least['listops']:g}%)")
            else:
                pending(f"{text} (threshold {100 * least['listops']:g}%)")
        elif rs:
            acc = float(np.mean([r["test"] for r in rs]))
            maj = rs[0]["baseline"]["majority"]
            out.append(f"- {ref} beats the majority class on ListOps ({100 * maj:.1f}% on this test split) by a "
                       f"wide margin (10 points or more): {100 * acc:.1f}% -> {verdict(acc >= maj + 0.10)}")
        else:
            pending(f"{ref} beats the majority class on ListOps by 10 points or more")
    if "pathfinder" in settings:
        rs = ref_rows("pathfinder")
        if rs:
            acc = float(np.mean([r["test"] for r in rs]))
            maj = rs[0]["baseline"]["majority"]
            out.append(f"- {ref} beats the majority class on Pathfinder ({100 * maj:.1f}%): {100 * acc:.1f}% -> "
                       f"{verdict(acc > maj)} (LRA's short-trained models often sit at chance here)")
        else:
            pending(f"{ref} beats the majority class on Pathfinder")
    if "bytes_lm" in settings:
        rs = ref_rows("bytes_lm")
        if rs:
            bpb = float(np.mean([r["test"] for r in rs]))
            uni = rs[0]["baseline"]["unigram_bits"]
            out.append(f"- bits per byte far below 8 (uniform) and below the unigram entropy of the test bytes "
                       f"({uni:.2f}): {ref} gets {bpb:.3f} -> {verdict(bpb < min(8.0, uni))}")
        else:
            pending(f"bits per byte of {ref} below the unigram entropy of the test bytes")
    if ref is not None:
        twin = get_spec(ref).fast_exact
        out.append(f"- `{ref}` trains on the {twin} kernel (`nn` models' `fast_exact=True`: the same function, "
                   f"tested equal forward and backward), so its row and `{twin}`'s agree to float32 rounding.")
    out.append("")
    return out


def write_outputs(out: str | Path, rows: Sequence[dict], cfg: AccuracyConfig, skipped: dict | None = None) -> list[dict]:
    """table.md, rows.csv, rows.json, curves.png, pareto.png from the stored rows; returns the rows, sorted."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    skipped = dict(skipped or {})
    rows = sorted(rows, key=lambda r: (r.get("task", ""), r.get("variant", ""), r.get("seed", 0)))
    env = ea_report.environment(cfg.preset)
    skipped_rows = [{"variant": v, "task": t, "status": "skipped", "reason": why} for (v, t), why in skipped.items()]
    ea_report.write_csv(out / "rows.csv", list(rows) + skipped_rows, CSV_COLUMNS)
    ea_report.write_json(out / "rows.json", {"environment": env, "config": dataclasses.asdict(cfg),
                                             "rows": list(rows), "skipped": skipped_rows})
    cost_dir = out.parent.parent / "cost" / cfg.preset
    cost = load_cost(cost_dir)
    cost_note = plot_pareto(rows, cfg, cost, out / "pareto.png")
    if cost is None:
        cost_note = f"cost results missing: run cost_scaling first (looked for {cost_dir / 'rows.json'})"
    plot_curves(rows, cfg, out / "curves.png")
    ea_report.write_atomic(out / "table.md", markdown(rows, cfg, skipped, env, cost_note))
    return list(rows)
