"""Writing results: atomic files, resumable row stores, the environment stamp, Markdown tables.

Every experiment writes under ``results/<experiment>/<preset>/``:

- ``rows.jsonl`` via ``RowStore``: one JSON object per finished unit of work, appended and
  fsynced as each finishes, so an interrupted sweep keeps what it finished and a rerun skips it;
- ``rows.json`` / ``rows.csv`` / ``table.md``: rebuilt from the store with ``write_atomic``
  (write to a temporary file, then ``os.replace``), so a reader never sees a half-written table.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from efficient_attn import allocator

__all__ = ["RowStore", "write_atomic", "write_json", "write_csv", "read_stored_json", "markdown_table", "fixed",
           "to_ms", "to_mib", "environment", "row_environment", "measured_environment"]


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(text, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy / jax scalars
        return _jsonable(x.item())
    return x


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_stored_json(out: str | Path) -> dict[str, Any]:
    """What the last run wrote into ``out/rows.json`` (its ``environment``, ``config``, ``rows``
    and the experiment's extras), or {} when there is none or it cannot be read: a re-render
    takes its scope from here, and a missing or torn file means "no stored scope", not an error."""
    try:
        stored = json.loads((Path(out) / "rows.json").read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    columns = list(columns) if columns is not None else _union_keys(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _jsonable(r.get(k)) for k in columns})
    write_atomic(path, buf.getvalue())


def _union_keys(rows: Iterable[dict]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    return keys


class RowStore:
    """An append-only JSON-lines file of finished rows, keyed for resumption.

    ``store.has(key)`` tells whether a unit of work is done; ``store.add(key, row)`` appends
    it durably (one ``write`` + ``fsync`` of one line) and keeps the row as a reload will
    read it (non-finite floats as None, tuples as lists), so a run's tables do not depend on
    whether its rows were computed now or read back. ``force=True`` starts from an empty store.

    A kill in the middle of an append leaves a torn last line (no newline). Loading ignores
    it, so its unit is pending and is redone; the next ``add`` first cuts the fragment off
    (were the new line appended to it, the two would fuse into one unreadable line and the
    redone unit would be lost again on the following load). A last line that is a whole
    record missing only its newline is kept and terminated instead. An unreadable line
    elsewhere (an older file damaged that way) is skipped.
    """

    def __init__(self, path: str | Path, *, force: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if force and self.path.exists():
            self.path.unlink()
        self.refresh()

    def refresh(self) -> None:
        """Read the file again: rows other processes appended since are seen (several workers
        of one sweep share a store; ``add`` appends under an exclusive lock)."""
        self._rows: dict[str, dict] = {}
        # (file size when loaded, byte offset where the unterminated last line starts, whether
        # that line is a whole record): what ``add`` repairs first; None when the file is clean
        self._tail: tuple[int, int, bool] | None = None
        if self.path.exists():
            data = self.path.read_bytes()
            *lines, last = data.split(b"\n")
            for line in lines:
                self._load_line(line)
            if last:
                whole = self._load_line(last)
                self._tail = (len(data), len(data) - len(last), whole)

    def _load_line(self, line: bytes) -> bool:
        """Add the record on ``line``; False (and nothing added) when it is not one."""
        try:
            rec = json.loads(line)
            key, row = rec["key"], rec["row"]
        except (ValueError, TypeError, KeyError):  # torn or damaged (ValueError covers bad UTF-8 and JSON)
            return False
        self._rows[key] = row
        return True

    @staticmethod
    def make_key(*parts: Any) -> str:
        return "|".join(str(p) for p in parts)

    def has(self, key: str) -> bool:
        return key in self._rows

    def get(self, key: str) -> dict | None:
        return self._rows.get(key)

    def _repair_tail(self) -> None:
        size, start, whole = self._tail
        self._tail = None
        if not self.path.exists():
            return
        if whole or self.path.stat().st_size != size:
            # a record that lacks only its newline, or a file another writer has grown since
            # it was loaded (cutting at the old offset could drop its lines): terminate the
            # line, so that the next record starts on a line of its own
            with open(self.path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            return
        os.truncate(self.path, start)

    def add(self, key: str, row: dict) -> None:
        line = json.dumps({"key": key, "row": _jsonable(row)}) + "\n"
        with open(self.path, "ab") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # one writer at a time: the workers of a sweep share the file
            try:
                if self._tail is not None:
                    self._repair_tail()
                os.write(f.fileno(), line.encode())  # one write of the whole line
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        self._rows[key] = json.loads(line)["row"]

    def rewrite(self, updates: Mapping[str, dict]) -> None:
        """Replace the rows of ``updates``' keys and write the store anew, one line per key, in
        one atomic replace (a kill leaves the old file or the new one, never a part). For a
        change to many stored rows at once, which ``add`` would append as a second copy of each."""
        with open(self.path, "ab") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                self.refresh()  # rows another writer appended since this store was loaded
                for key, row in updates.items():
                    self._rows[key] = json.loads(json.dumps(_jsonable(row)))
                write_atomic(self.path, "".join(json.dumps({"key": k, "row": r}) + "\n" for k, r in self._rows.items()))
                self._tail = None
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def rows(self) -> list[dict]:
        return list(self._rows.values())

    def keys(self) -> list[str]:
        """The keys of ``rows()``, in the same order."""
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def sweep_store(path: str | Path, cfg: Any, presets: Mapping[str, Any], *, force: bool) -> RowStore:
    """The row store of a sweep run with config ``cfg`` (whose ``preset`` names it in ``presets``,
    a config or a function returning one).

    ``force`` on the preset exactly as defined starts from an empty store (the rows of points
    the preset no longer has go too). ``force`` on a narrowed config (a variant subset, another
    length or budget) keeps every row: the sweep measures its selected points again and each
    new row replaces its old one (the last line of a key wins on load), so ``--force
    --variants X`` cannot throw away the other variants' measurements. Sweeps that take
    ``force`` treat it as "every selected point is pending".
    """
    defined = presets.get(getattr(cfg, "preset", None))
    defined = defined() if callable(defined) else defined
    return RowStore(path, force=force and defined is not None and cfg == defined)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "-"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.2e}"
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x).replace("|", "\\|")


def fixed(x: float, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals, a value that rounds to zero printed without a sign (a flat
    fit's slope comes out as +-1e-6 depending on the BLAS, and a table must not flip on it)."""
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def to_ms(seconds: float | None) -> float | None:
    """Seconds in milliseconds, for the tables (None stays None: not measured)."""
    return None if seconds is None else 1e3 * seconds


def to_mib(n_bytes: float | None) -> float | None:
    """Bytes in MiB (2**20), for the tables (None stays None)."""
    return None if n_bytes is None else n_bytes / 2**20


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats get 3 significant digits, None prints as '-'."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(x) for x in r) + " |")
    return "\n".join(lines) + "\n"


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or "unknown"
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(preset: str | None = None, **extra: Any) -> dict[str, Any]:
    """Versions, backend, device, CPU model, core count, commit and preset, for every results file."""
    import flax
    import jax

    devices = jax.devices()
    env = {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": devices[0].device_kind if devices else "none",
        "device_count": len(devices),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "commit": _git_commit(),
        "allocator": allocator.describe(),
        "preset": preset,
    }
    env.update(extra)
    return env


# What a row keeps of the environment it was measured in (an experiment's table, re-rendered
# later or from the rows of several resumed runs, then states where its numbers come from).
ROW_ENV_FIELDS = ("commit", "cpu", "cpu_cores", "backend", "device", "jax", "flax", "python", "allocator")


def row_environment(preset: str | None = None) -> dict[str, Any]:
    """The part of ``environment`` a measured row stores (``ROW_ENV_FIELDS``)."""
    return {k: v for k, v in environment(preset).items() if k in ROW_ENV_FIELDS}


def measured_environment(rows: Iterable[dict | None], stored: Path | None = None) -> dict[str, Any]:
    """Where ``rows`` were measured: the last row's environment, with every commit the rows
    name. Rows stored before they kept one fall back to the environment of the ``stored``
    rows.json (the run that wrote them), then to this process's."""
    envs = [r["environment"] for r in rows if r and r.get("environment")]
    if envs:
        commits = list(dict.fromkeys(e.get("commit") for e in envs))
        return {**envs[-1], "commit": ", ".join(map(str, commits))}
    if stored is not None and stored.exists():
        try:
            env = json.loads(stored.read_text()).get("environment")
        except (OSError, ValueError):
            env = None
        if isinstance(env, dict):
            return env
    return environment()


def legend_entries(axes: Iterable[Any]) -> tuple[list[Any], list[str]]:
    """The legend handles and labels of several matplotlib axes, each label once (first seen
    wins), for one figure-level legend over subplots that share their series."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    return handles, labels
