"""Long-sequence tasks, generated or read locally (no downloads), deterministic given a seed.

    from efficient_attn import tasks
    tasks.TASKS                     # ("listops", "pathfinder", "mqar", "bytes_lm", "selective_copy")
    data = tasks.load("listops", seq_len=512, num_train=2000, num_val=200, num_test=200,
                      seed=0, max_depth=10)          # -> TaskData (see tasks/base.py)

``load`` caches the arrays on disk (``tasks/cache.py``; ``cache_dir`` default
``$EA_CACHE_DIR`` or ``~/.cache/efficient_attn``); ``generate`` takes the same arguments
and always regenerates. Generator parameters are keyword arguments (``**params``); an
unknown one raises a ``ValueError`` listing the valid ones (``tasks.parameters(name)``).

listops     LRA's ListOps generator, 10 classes; ``seq_len`` = max length       (listops.py)
pathfinder  Pathfinder images, binary; ``seq_len`` = side^2 (1024 = 32 x 32)      (pathfinder.py)
mqar        Zoology's multi-query associative recall, next-token, causal        (mqar.py)
bytes_lm    byte-level LM on the Python stdlib's sources, bits per byte, causal (bytes_lm.py)
selective_copy  MAD's selective copying: K tokens among noise, copied after a marker (selective_copy.py)

What experiments may ask of a task beyond its data (each a module-level declaration):

``bidirectional_safe(name)``  the module's ``BIDIRECTIONAL_SAFE``: True when no answer is in the
                              input at or after the position that predicts it, so that a
                              bidirectional model cannot read it (MQAR: values never follow
                              their query); default False.
``eval_groups(data, split)``  the module's ``eval_groups``: a name and one integer per row of the
                              split, to report the metric per group (MQAR: the pair count of the
                              row); None when the task declares none.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from types import ModuleType

from efficient_attn.tasks.base import IGNORE, Split, TaskData
from efficient_attn.tasks.common import build_config, check_counts

TASKS = ("listops", "pathfinder", "mqar", "bytes_lm", "selective_copy")
_CONFIGS = {
    "listops": "ListOpsConfig",
    "pathfinder": "PathfinderConfig",
    "mqar": "MQARConfig",
    "bytes_lm": "BytesLMConfig",
    "selective_copy": "SelectiveCopyConfig",
}

__all__ = ["TASKS", "load", "generate", "parameters", "bidirectional_safe", "eval_groups", "TaskData", "Split",
           "IGNORE"]


def _module(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {list(TASKS)}")
    return importlib.import_module(f"efficient_attn.tasks.{name}")


def parameters(name: str) -> dict:
    """The generator parameters of task ``name`` and their defaults (None = depends on seq_len)."""
    cls = getattr(_module(name), _CONFIGS[name])
    return {f.name: f.default for f in dataclasses.fields(cls)}


def bidirectional_safe(name: str) -> bool:
    """Whether a bidirectional model can be trained on task ``name`` without reading an answer
    from its input (the module's ``BIDIRECTIONAL_SAFE``; False when it declares nothing)."""
    return bool(getattr(_module(name), "BIDIRECTIONAL_SAFE", False))


def eval_groups(data: TaskData, split: Split):
    """``(name, groups)`` with one integer per row of ``split`` (a task's own grouping for
    per-group scores, e.g. MQAR's pairs per row), or None when the task declares none."""
    fn = getattr(_module(data.name), "eval_groups", None)
    return None if fn is None else fn(data, split)


def _prepare(name, seq_len, num_train, num_val, num_test, seed, params):
    module = _module(name)
    check_counts(name, seq_len, num_train, num_val, num_test, seed)
    config = build_config(name, getattr(module, _CONFIGS[name]), params)
    counts = dict(seq_len=seq_len, num_train=num_train, num_val=num_val, num_test=num_test, seed=seed)
    return module, config, counts


def generate(
    name: str, *, seq_len: int, num_train: int, num_val: int, num_test: int, seed: int = 0, **params
) -> TaskData:
    """Generate task ``name`` without the cache (same arguments as ``load``)."""
    module, config, counts = _prepare(name, seq_len, num_train, num_val, num_test, seed, params)
    return module.generate(config, **counts)


def _cache_spec(name: str, module: ModuleType, config, counts: dict) -> dict:
    spec = {"task": name, "version": module.VERSION, "config": dataclasses.asdict(config), **counts}
    if name == "bytes_lm":  # the corpus is the machine's stdlib: key on its file list too
        spec["corpus"] = module.corpus_fingerprint(config)
    return spec


def load(
    name: str,
    *,
    seq_len: int,
    num_train: int,
    num_val: int,
    num_test: int,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    **params,
) -> TaskData:
    """Task ``name`` as a ``TaskData``, from the on-disk cache when present.

    seq_len:   the padded length L of every array (pathfinder: a square, side^2).
    num_*:     examples per split (train >= 1, val and test >= 0).
    seed:      same seed, same arrays; a different seed gives different arrays.
    cache_dir: where the ``.npz`` cache lives (default ``$EA_CACHE_DIR`` or
               ``~/.cache/efficient_attn``).
    **params:  the generator's parameters (``parameters(name)`` lists them).
    """
    from efficient_attn.tasks import cache

    module, config, counts = _prepare(name, seq_len, num_train, num_val, num_test, seed, params)
    spec = _cache_spec(name, module, config, counts)
    return cache.cached(name, spec, lambda: module.generate(config, **counts), cache_dir)
