"""The cost experiment: time, memory and FLOPs of every registered variant against the length N.

For each variant, pass ("fwd": the attention call; "fwd_bwd": the gradient of <out, g> with
respect to q, k, v and the variant's parameters), masking (bidirectional and causal, each
where the variant's capabilities allow it) and length N, one point is measured (``point``):
time (median and spread of timed calls, compile apart), compiled memory, FLOPs and the
fraction of this machine's matmul rate measured in the same run.

Then per variant (``analysis``, ``report``): log-log slopes of time and memory against N
beside the slopes its capabilities claim, speed-up and memory ratio against each baseline
(``baselines()``, from the registry: the exact variant with quadratic memory, ``full``, and
its declared fast exact twin, ``blockwise``), and the crossover length against each. LRA's
Table 2 (Tay et al. 2020, "Long Range Arena", arXiv 2011.04006) compared against the naive
Transformer only; the second baseline moves the crossovers, and the table shows both.

The LRA Table 2 analog (``table2``): training steps per second and compiled memory of LRA's
byte-level text classifier (scaled down by the preset) at 1K-4K tokens for every variant,
relative to the quadratic reference, beside the published numbers (``published``).

The package, one concept a module:

    config.py     CostConfig, Table2Config, InterfaceConfig (frozen dataclasses)
    presets.py    quick(), cpu(), lra(): the named factories; PRESETS = their configs
    point.py      one (variant, pass, masking, N) point measured
    budgets.py    what is skipped (time, memory, compile budgets; the deadline) or already done
    table2.py     the Table 2 analog's training steps measured
    interface.py  grouped-query heads (Hkv = 8, 2, 1 of 8) and packed against padded batches,
                  for the exact baselines that have them (full, blockwise): table_interface.md
    run.py        the sweep: every point of a config into the RowStore (resumable)
    analysis.py   slopes, crossovers, the registry's baselines (from stored rows)
    report.py     table.md, table2.md, rows.csv, rows.json (from stored rows only)
    plots.py      time.png, memory.png
    published.py  LRA's published Table 2 (a citation)
    cli.py        ``main(argv)``: the command line

Run: ``python experiments/cost_scaling.py --preset quick`` or ``efficient-attn bench``;
``--report-only`` rebuilds the tables from the stored rows without measuring.
"""

from efficient_attn.sweeps.cost.analysis import analyse, baselines, quadratic_reference
from efficient_attn.sweeps.cost.cli import config_from_args, main, parse_args
from efficient_attn.sweeps.cost.config import PASSES, GiB, MiB, CostConfig, SlopesConfig, Table2Config
from efficient_attn.sweeps.cost.plots import plot
from efficient_attn.sweeps.cost.point import measure_point
from efficient_attn.sweeps.cost.presets import FACTORIES, PRESETS
from efficient_attn.sweeps.cost.published import PUBLISHED_LENGTHS, PUBLISHED_TABLE2
from efficient_attn.sweeps.cost.report import CSV_COLUMNS, cost_markdown, table2_markdown, table2_rows, write_outputs
from efficient_attn.sweeps.cost.run import MODES, run, select_variants
from efficient_attn.sweeps.cost.table2 import TEXT_CLASSES, TEXT_VOCAB, measure_train_step, run_table2

__all__ = [
    "CostConfig", "SlopesConfig", "Table2Config", "PRESETS", "FACTORIES", "run", "write_outputs", "main",
    "parse_args", "config_from_args", "select_variants", "measure_point", "measure_train_step", "run_table2",
    "analyse", "baselines", "quadratic_reference", "cost_markdown", "plot", "table2_rows", "table2_markdown",
    "BASELINES", "PASSES", "MODES", "CSV_COLUMNS", "PUBLISHED_TABLE2", "PUBLISHED_LENGTHS",
    "TEXT_VOCAB", "TEXT_CLASSES", "MiB", "GiB",
]


def __getattr__(name: str):
    # BASELINES is read from the registry when asked for, so a plugin loaded later counts.
    if name == "BASELINES":
        return baselines()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
