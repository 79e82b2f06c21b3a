"""The kernel benchmark's sweep: every unit of a config into a RowStore.

Each finished unit is appended to ``out/rows.jsonl`` as it completes, so a killed run
resumes where it stopped (``force`` starts over); the tables are rebuilt from the store at
the end, on an error and on Ctrl-C. A unit that raises is stored as an error with its reason
and the sweep goes on; errors are tried again on a rerun, and so are peers rows that found a
peer not installed that is installed now.
"""

from __future__ import annotations

from pathlib import Path

import jax

from efficient_attn import report
from efficient_attn.sweeps.exact import peer_rows
from efficient_attn.sweeps.exact import units as units_
from efficient_attn.sweeps.exact.config import ExactConfig
from efficient_attn.sweeps.exact.presets import PRESETS
from efficient_attn.sweeps.exact.report import summary_line, write_outputs

__all__ = ["run", "rows_of", "is_done"]

def is_done(row: dict | None) -> bool:
    """Stored as ok and, for a peers row, no peer it found missing installed since."""
    return row is not None and row.get("status") == "ok" and not peer_rows.installed_since(row)


def _error_row(unit: units_.Unit, cfg: ExactConfig, err: BaseException) -> dict:
    first = (str(err).strip().splitlines() or [""])[0]
    return {**units_.base_row(unit, cfg), "status": "error", "reason": f"{type(err).__name__}: {first}"}


def run(cfg: ExactConfig, out: str | Path, *, force: bool = False, report_only: bool = False,
        log=print) -> report.RowStore:
    """Measure every unit of ``cfg`` not already finished in ``out/rows.jsonl``; write the tables."""
    if report_only and force:
        raise ValueError("exact: report_only=True re-renders the stored rows; it cannot be combined with force")
    out = Path(out)
    store = report.sweep_store(out / "rows.jsonl", cfg, PRESETS, force=force)
    todo = [] if report_only else [u for u in units_.units(cfg) if force or not is_done(store.get(units_.row_key(u, cfg)))]
    if not todo:
        write_outputs(out, rows_of(cfg, store), cfg)
        return store
    env = units_.row_environment(cfg.preset)
    try:
        for unit in todo:
            try:
                row = units_.measure_unit(unit, cfg)
            except Exception as err:  # recorded, retried on a rerun; the other units still run
                row = _error_row(unit, cfg, err)
            row["environment"] = env
            store.add(units_.row_key(unit, cfg), row)
            log(summary_line(store.get(units_.row_key(unit, cfg))))
            jax.clear_caches()  # the long units' compiled programs are not needed again
    finally:
        write_outputs(out, rows_of(cfg, store), cfg)
    return store


def rows_of(cfg: ExactConfig, store: report.RowStore) -> list[dict]:
    """The stored rows of ``cfg``'s units, in visiting order."""
    rows = [store.get(units_.row_key(u, cfg)) for u in units_.units(cfg)]
    return [r for r in rows if r is not None]
