"""Byte-level causal language modelling on the Python standard library's own source files.

Corpus: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, sorted by relative
path, excluding ``site-packages`` / ``dist-packages`` (installed packages differ between
machines) and ``__pycache__``. Every machine that runs this project has it, so nothing is
downloaded; it is real, varied text (code, docstrings, comments).

Split BY FILE, never by window, so no file contributes to two splits: a file goes to
    test  if h < test_percent,  val  if h < test_percent + val_percent,  else train,
where h = int(sha256(relative posix path)[:8], 16) % 100. That depends only on the path, so
the split is the same in every run and for every seed (for one Python installation).

Windows: within each split, the files are shuffled by the seed and their bytes concatenated
in that order (file boundaries are not marked); windows of ``seq_len + 1`` bytes start every
``stride`` bytes of that stream (default ``seq_len + 1``: consecutive, non-overlapping; a
smaller stride gives more, overlapping and so less independent, windows: the stdlib has
about 28 MB of training text, i.e. about 27,000 disjoint windows of 1025 bytes), and only as
many files are read as the requested number of windows needs. Window w gives ``inputs = w[:-1]`` and
``targets = w[1:]`` (every position is scored; ``mask`` all True, no padding).
``vocab_size`` = ``num_classes`` = 256; metric ``bits_per_byte`` = mean cross-entropy in
nats / ln 2 over the target bytes. ``kind="token"``, ``causal=True``.

Packing (``tasks/packing.py``, ``PACKABLE = True``): generate windows of the example length,
then ``pack_task(data, length)`` lays several end to end in rows of ``length`` with segment
ids; every window keeps its own targets, so none predicts the first byte of the next.

A request for more windows than the split holds raises an error giving the number available.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from efficient_attn.core import check_config, check_positive_int
from efficient_attn.tasks.base import TaskData
from efficient_attn.tasks.common import rng, three_splits

NAME = "bytes_lm"
VERSION = 1
PACKABLE = True  # every target is the window's own next byte: windows pack (tasks/packing.py)
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class BytesLMConfig:
    """Corpus location and split fractions (percent of files, by path hash).

    root None = this interpreter's stdlib directory."""

    root: str | None = None
    val_percent: int = 5
    test_percent: int = 5
    stride: int | None = None  # window start spacing; None = seq_len + 1 (no overlap)

    def __post_init__(self):
        check_positive_int(NAME, "val_percent", self.val_percent, minimum=1)
        check_positive_int(NAME, "test_percent", self.test_percent, minimum=1)
        check_config(
            NAME,
            self.val_percent + self.test_percent < 100,
            f"val_percent + test_percent must be < 100, got {self.val_percent} + {self.test_percent}",
        )
        check_config(NAME, self.root is None or isinstance(self.root, str), f"root must be a str path, got {self.root!r}")
        if self.stride is not None:
            check_positive_int(NAME, "stride", self.stride)

    def resolve(self) -> "BytesLMConfig":
        root = self.root if self.root is not None else sysconfig.get_paths()["stdlib"]
        check_config(NAME, os.path.isdir(root), f"corpus root {root!r} is not a directory")
        return dataclasses.replace(self, root=str(root))


def list_files(root: str | os.PathLike) -> list[str]:
    """Relative posix paths of the corpus files under ``root``, sorted."""
    root = os.fspath(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for f in filenames:
            if f.endswith(".py"):
                full = os.path.join(dirpath, f)
                if os.path.isfile(full):
                    found.append(Path(os.path.relpath(full, root)).as_posix())
    return sorted(found)


def path_bucket(rel_path: str) -> int:
    """Stable bucket in [0, 100) of a relative path (sha256, not Python's salted ``hash``)."""
    return int(hashlib.sha256(rel_path.encode("utf-8")).hexdigest()[:8], 16) % 100


def split_of(rel_path: str, cfg: BytesLMConfig) -> str:
    """"train", "val" or "test" for one file."""
    h = path_bucket(rel_path)
    if h < cfg.test_percent:
        return "test"
    if h < cfg.test_percent + cfg.val_percent:
        return "val"
    return "train"


def split_files(cfg: BytesLMConfig) -> dict[str, list[str]]:
    """The three disjoint, sorted file lists of the corpus."""
    cfg = cfg.resolve()
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for rel in list_files(cfg.root):
        out[split_of(rel, cfg)].append(rel)
    return out


def corpus_fingerprint(cfg: BytesLMConfig) -> str:
    """Hash of (path, size) of every corpus file and the Python version: a cache key part."""
    cfg = cfg.resolve()
    h = hashlib.sha256(sys.version.encode())
    for rel in list_files(cfg.root):
        h.update(rel.encode() + b"\0" + str(os.path.getsize(os.path.join(cfg.root, rel))).encode() + b"\n")
    return h.hexdigest()[:16]


def _windows(root: str, files: list[str], order: np.ndarray, count: int, width: int, stride: int, split: str):
    """``count`` windows of ``width`` bytes, ``stride`` apart, from the files in ``order``."""
    need = (count - 1) * stride + width if count else 0
    chunks, have, used = [], 0, []
    for i in order:
        if have >= need:
            break
        data = Path(root, files[i]).read_bytes()
        chunks.append(data)
        have += len(data)
        used.append(files[i])
    if have < need:
        available = 0 if have < width else (have - width) // stride + 1
        raise ValueError(
            f"bytes_lm: the {split} split ({len(files)} files, {have} bytes) holds only {available} "
            f"windows of seq_len+1={width} bytes at stride {stride}, {count} requested; ask for fewer, "
            "a shorter seq_len or a smaller stride"
        )
    stream = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    starts = np.arange(count) * stride
    return stream[starts[:, None] + np.arange(width)[None, :]], used


def generate(cfg: BytesLMConfig, *, seq_len: int, num_train: int, num_val: int, num_test: int, seed: int) -> TaskData:
    """Windows of ``seq_len + 1`` bytes from each split's files, in a seed-shuffled file order."""
    cfg = cfg.resolve()
    files = split_files(cfg)
    width = seq_len + 1
    stride = cfg.stride if cfg.stride is not None else width
    rows, used = [], {}
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        names = files[split]
        order = rng(NAME, seed, split).permutation(len(names))
        w, used[split] = _windows(cfg.root, names, order, count, width, stride, split)
        rows.append(w)
    data = np.concatenate(rows, axis=0).astype(np.int32)
    inputs, targets = data[:, :-1], data[:, 1:]
    mask = np.ones_like(inputs, dtype=bool)
    train, val, test = three_splits(inputs, targets, mask, num_train, num_val)
    params = dataclasses.asdict(cfg)
    params.update(
        python=sys.version.split()[0],
        files={k: len(v) for k, v in files.items()},
        files_read={k: len(v) for k, v in used.items()},
    )
    return TaskData(
        name=NAME,
        kind="token",
        causal=True,
        vocab_size=256,
        num_classes=256,
        seq_len=seq_len,
        train=train,
        val=val,
        test=test,
        metric="bits_per_byte",
        params=params,
    )
