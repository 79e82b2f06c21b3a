"""The decode-cost experiment: what one generated token costs, against the context length.

At inference, softmax attention reads a KV cache that grows with the context, while linear
and recurrent variants carry a state of fixed size. For every decode-capable variant
(``capabilities.decode``), batch and context length, one point (``point``) times the
variant's ``step`` on a state holding that context and sizes the state; the analysis
(``analysis``) fits slopes against the context, the growth of the step time from the
shortest to the longest context, the speed-up over ``full``'s KV-cache step and the context
from which each variant is faster (crossover); the report (``report``, ``plots``) writes
table.md, rows.csv, rows.json and decode.png from the stored rows only.

The package, one concept a module:

    config.py     DecodeCostConfig (frozen dataclass)
    presets.py    quick() (1K-16K), cpu() and lra() (1K-64K): the named factories; PRESETS their configs
    point.py      one (variant, batch, context) point: the synthetic state, the timed step program
    growth.py     a fixed-state step at the shortest and longest context, timed in interleaved rounds
    run.py        the sweep: every point of a config into the RowStore (resumable), budgets
    analysis.py   slopes, growth, speed-ups, crossovers (from stored rows)
    report.py     table.md, rows.csv, rows.json (from stored rows only)
    plots.py      decode.png
    cli.py        ``main(argv)``: the command line

Run: ``python experiments/decode_cost.py --preset quick``; ``--report-only`` rebuilds the
tables from the stored rows without measuring.
"""

from efficient_attn.sweeps.decode_cost.analysis import baseline, summarise
from efficient_attn.sweeps.decode_cost.cli import config_from_args, main, parse_args
from efficient_attn.sweeps.decode_cost.config import DecodeCostConfig
from efficient_attn.sweeps.decode_cost.presets import FACTORIES, PRESETS
from efficient_attn.sweeps.decode_cost.report import markdown, write_outputs
from efficient_attn.sweeps.decode_cost.run import growth_rows_of, run, select_variants

__all__ = ["DecodeCostConfig", "PRESETS", "FACTORIES", "run", "select_variants", "growth_rows_of", "write_outputs",
           "markdown",
           "summarise", "baseline", "main", "parse_args", "config_from_args"]
