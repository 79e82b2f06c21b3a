"""The approximation sweep: every pending unit of a config measured into a RowStore, the
pattern picture drawn, the outputs written from the stored rows.

A rerun skips finished rows (``force`` recomputes); a unit that raised is stored as an error
and retried on the next run. Each skipped (variant, input, masking) is stored too, as a row of
status ``skipped`` with its reason. ``report_only`` measures nothing: the outputs are rebuilt
from the stored rows and the cached pattern matrices, for the variants that have stored rows
(measured or skipped), so a variant the measuring run had nothing to measure for keeps its
skip notes.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from efficient_attn import registry, report
from efficient_attn.sweeps.approximation import compare
from efficient_attn.sweeps.approximation.config import ApproxConfig
from efficient_attn.sweeps.approximation.inputs import trained_inputs, trained_summary
from efficient_attn.sweeps.approximation.pictures import pattern_panels
from efficient_attn.sweeps.approximation.plan import plan_units, skip_key, unit_key
from efficient_attn.sweeps.approximation.presets import PRESETS
from efficient_attn.sweeps.approximation.report import write_outputs

__all__ = ["run"]


def _done(store: report.RowStore, cfg: ApproxConfig, u: dict) -> bool:
    row = store.get(unit_key(cfg, u))
    return row is not None and row["status"] == "ok"


def run(cfg: ApproxConfig, out: str | Path, *, force: bool = False, progress: bool = True, log=print,
        report_only: bool = False) -> list[dict]:
    """Measure every pending unit of ``cfg``, draw the patterns, write the outputs; return the rows
    (None for a unit not measured). ``progress=False`` drops the running row count (errors and
    the summary lines stay)."""
    if report_only and force:
        raise ValueError("approximation: report_only=True re-renders the stored rows; it cannot be combined "
                         "with force=True")
    out = Path(out)
    store = report.sweep_store(out / "rows.jsonl", cfg, PRESETS, force=force)
    variants = list(cfg.variants) if cfg.variants is not None else registry.list_variants()
    for name in variants:
        registry.get_spec(name)  # unknown names fail now, with suggestions
    units, skipped = plan_units(cfg, variants)
    if report_only:  # the tables of the stored rows: variants without any (measured or skipped) are left out
        stored = {u["variant"] for u in units if store.has(unit_key(cfg, u))}
        stored |= {s["variant"] for s in skipped if store.has(skip_key(cfg, s))}
        variants = [v for v in variants if v in stored]
        units, skipped = plan_units(cfg, variants)
    else:
        _store_skips(cfg, skipped, store)
    pending = [] if report_only else [u for u in units if force or not _done(store, cfg, u)]
    log(f"approximation ({cfg.preset}): {len(units)} rows, {sum(_done(store, cfg, u) for u in units)} already done")
    _measure(cfg, pending, store, out, force, progress, log)
    rows = [store.get(unit_key(cfg, u)) for u in units]
    extra = trained_summary(out / "trained_qkv.npz") if cfg.trained is not None else {}
    t1 = time.perf_counter()
    panels = pattern_panels(cfg, variants, out / "patterns.npz", force, log, compute=not report_only)
    log(f"  patterns.png: {len(panels)} variants ({time.perf_counter() - t1:.0f} s)")
    write_outputs(cfg, rows, skipped, panels, out, extra)
    return rows


def _store_skips(cfg: ApproxConfig, skipped: list[dict], store: report.RowStore) -> None:
    for s in skipped:
        row = {**s, "status": "skipped"}
        if store.get(skip_key(cfg, s)) != row:  # a rerun appends nothing new
            store.add(skip_key(cfg, s), row)


def _measure(cfg: ApproxConfig, pending: list[dict], store: report.RowStore, out: Path, force: bool,
             progress: bool, log) -> None:
    reference_cache: dict = {}
    trained = None
    t0 = time.perf_counter()
    for i, u in enumerate(pending):
        if u["input"] == "trained" and trained is None:
            trained = trained_inputs(cfg, out / "trained_qkv.npz", force, log)
        try:
            row = compare.measure_unit(cfg, u, reference_cache, trained)
        except Exception as err:  # noqa: BLE001  (one failing unit must not stop the sweep)
            row = {k: u[k] for k in ("input", "variant", "hyperparameter", "value", "causal", "q_scale")}
            row.update(status="error", error=f"{type(err).__name__}: {err}")
            log(f"  error: {u['variant']} {u['hyperparameter']}={u['value']}: {row['error']}")
            log("".join(traceback.format_exception_only(type(err), err)).strip())
        row["budget_note"] = u["budget_note"]
        store.add(unit_key(cfg, u), row)
        if progress and ((i + 1) % 10 == 0 or i + 1 == len(pending)):
            log(f"  {i + 1}/{len(pending)} rows ({time.perf_counter() - t0:.0f} s)")
