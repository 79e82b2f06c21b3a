"""On-disk cache of generated task arrays: ``.npz`` files written atomically, checked on read.

File name: ``<task>-<key>-<checksum>.npz`` where ``key`` is the first 16 hex digits of the
sha256 of the generator's name, version and every parameter (JSON, sorted keys), and
``checksum`` the first 16 hex digits of the sha256 of the content (metadata JSON, then each
array's name, dtype, shape and bytes in a fixed order). A lookup finds the files for ``key``,
loads one and recomputes its checksum: an unreadable or partial file, one whose content
does not match its name, or one whose arrays break the data contract (a token id outside the
task's vocabulary, a target outside its classes: ``TaskData`` checks them), is deleted and the
data regenerated. Writes go to a temporary file
in the same directory, are flushed and fsynced, then ``os.replace``d into place, so a reader
never sees half a file and concurrent writers of the same key are harmless.

Default directory: ``$EA_CACHE_DIR``, else ``~/.cache/efficient_attn``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from efficient_attn.tasks.base import Split, TaskData

_SPLITS = ("train", "val", "test")
_FIELDS = ("inputs", "targets", "mask")


def default_dir() -> Path:
    """``$EA_CACHE_DIR`` if set, else ``~/.cache/efficient_attn``."""
    env = os.environ.get("EA_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "efficient_attn"


def param_key(spec: dict) -> str:
    """16 hex digits identifying a generator call (name, version, all parameters)."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _meta(data: TaskData) -> dict:
    return {
        "name": data.name,
        "kind": data.kind,
        "causal": data.causal,
        "vocab_size": data.vocab_size,
        "num_classes": data.num_classes,
        "seq_len": data.seq_len,
        "metric": data.metric,
        "params": data.params,
    }


def _arrays(data: TaskData) -> dict[str, np.ndarray]:
    return {f"{s}_{f}": getattr(getattr(data, s), f) for s in _SPLITS for f in _FIELDS}


def checksum(meta_json: str, arrays: dict[str, np.ndarray]) -> str:
    """16 hex digits of sha256 over the metadata and the arrays (name, dtype, shape, bytes)."""
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\n{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def save(data: TaskData, directory: str | Path, key: str) -> Path:
    """Write ``data`` atomically as ``<name>-<key>-<checksum>.npz``; return the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta_json = json.dumps(_meta(data), sort_keys=True)
    arrays = _arrays(data)
    path = directory / f"{data.name}-{key}-{checksum(meta_json, arrays)}.npz"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{data.name}-{key}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __meta__=np.array(meta_json), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read(path: str | Path) -> TaskData:
    """Load a cache file, verifying its checksum against its name (``ValueError`` if wrong)."""
    path = Path(path)
    expected = path.stem.rsplit("-", 1)[-1]
    with np.load(path, allow_pickle=False) as z:
        meta_json = str(z["__meta__"][()])
        arrays = {f"{s}_{f}": z[f"{s}_{f}"] for s in _SPLITS for f in _FIELDS}
    got = checksum(meta_json, arrays)
    if got != expected:
        raise ValueError(f"cache file {path.name}: content checksum {got} does not match its name")
    meta = json.loads(meta_json)
    splits = {s: Split(arrays[f"{s}_inputs"], arrays[f"{s}_targets"], arrays[f"{s}_mask"]) for s in _SPLITS}
    try:
        return TaskData(**meta, **splits)  # checks every token id and target against the task's sizes
    except ValueError as err:
        raise ValueError(f"cache file {path.name}: {err}") from None


def cached(name: str, spec: dict, build: Callable[[], TaskData], directory: str | Path | None = None) -> TaskData:
    """The data for ``spec`` from the cache in ``directory``, else ``build()`` and store it.

    A corrupt, partial or mismatching file is removed and regenerated."""
    directory = Path(directory) if directory is not None else default_dir()
    key = param_key(spec)
    for path in sorted(directory.glob(f"{name}-{key}-*.npz")):
        try:
            return read(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
    data = build()
    save(data, directory, key)
    return data
