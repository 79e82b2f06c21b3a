"""The accuracy experiment: every registered variant on every task, over seeds (LRA Table 1 analog).

For each (variant, task, seed) the same model is trained with only the attention core
changed: the LRA encoder (``nn.Classifier``) for classification tasks (ListOps, Pathfinder),
the causal LM (``nn.CausalLM``) for token tasks (MQAR, bytes_lm). The reported score is the
test metric of the best-validation checkpoint (``train.train``): accuracy, or bits per byte
for bytes_lm. The dataset is fixed per task (``data_seed``); a seed changes the model
initialisation and the data order, so the spread is that of training.

A variant that cannot serve a task is skipped up front with the reason, never run wrongly:
a non-causal variant on a causal task; a variant without ``kv_mask`` on a task whose padding
a query could see (``train.needs_kv_mask``). A run that raises is recorded as an error with
its message and retried on the next invocation; neither stops the sweep, and the command
then exits 1.

Each finished run is a row of ``results/accuracy/<preset>/rows.jsonl`` (a ``RowStore``):
a rerun skips it (``--force`` retrains the selected rows and keeps the others), and an
interrupted run resumes from its last orbax checkpoint under the cache directory
(``$EA_CACHE_DIR/runs/accuracy/<preset>/``, by default ``~/.cache/efficient_attn``), never in
results/. Outputs, rebuilt from the store:
``table.md`` (variants x tasks, mean ± std over seeds, LRA's published Table 1 beside ours
where the task matches), ``rows.csv``, ``rows.json`` (config, environment, curves),
``curves.png`` and ``pareto.png`` (accuracy against the time and memory the cost experiment
measured at the same length). The sanity expectations are checked on the rows of the
registry's exact reference (the exact variant that names a fast exact twin: ``full``).

Presets: ``quick`` (every variant, every task, lengths 128-256, 1-layer width-64 models,
one seed, minutes on 2 CPU cores), ``cpu`` (lengths 512-1024, 3 seeds, about a day), ``lra``
(LRA's published configurations; an accelerator). Tay et al. 2020, "Long Range Arena: A
Benchmark for Efficient Transformers", arXiv 2011.04006. What was tried on the way to each
preset is in ``results/accuracy/<preset>/NOTES.md``.

The package, one concept a module:

    config.py     ModelSize, TaskSetting, AccuracyConfig; fingerprints; the rows a config owns
    presets.py    quick(), cpu(), lra(): the named factories; PRESETS = name -> factory
    run.py        plan (from capabilities), train, store rows (resumable)
    report.py     table.md, rows.csv, rows.json (from stored rows only)
    plots.py      curves.png, pareto.png (from stored rows and the cost experiment's rows)
    published.py  LRA's published Table 1 (a citation)
    cli.py        ``main(argv)``: the command line

Run: ``python experiments/accuracy.py --preset quick [--variants full,local] [--tasks mqar]``.
"""

from efficient_attn.sweeps.accuracy.cli import config_from_args, main, parse_args
from efficient_attn.sweeps.accuracy.config import TASK_TITLES, AccuracyConfig, ModelSize, TaskSetting
from efficient_attn.sweeps.accuracy.plots import plot_curves, plot_pareto
from efficient_attn.sweeps.accuracy.presets import PRESETS
from efficient_attn.sweeps.accuracy.published import PUBLISHED_TABLE1, PUBLISHED_TASKS
from efficient_attn.sweeps.accuracy.report import CSV_COLUMNS, markdown, write_outputs
from efficient_attn.sweeps.accuracy.run import plan, run

__all__ = [
    "ModelSize",
    "TaskSetting",
    "AccuracyConfig",
    "PRESETS",
    "PUBLISHED_TABLE1",
    "PUBLISHED_TASKS",
    "TASK_TITLES",
    "CSV_COLUMNS",
    "plan",
    "run",
    "markdown",
    "plot_pareto",
    "plot_curves",
    "write_outputs",
    "config_from_args",
    "parse_args",
    "main",
]
