"""The cost experiment's analysis, tables and plots under their former module name: the same
objects as ``efficient_attn.sweeps.cost`` (``analysis``, ``report``, ``plots``) export."""

from efficient_attn.sweeps.cost import (  # noqa: F401 - re-exported names
    CSV_COLUMNS,
    PASSES,
    PUBLISHED_LENGTHS,
    PUBLISHED_TABLE2,
    MiB,
    analyse,
    cost_markdown,
    plot,
    table2_markdown,
    table2_rows,
    write_outputs,
)

__all__ = ["analyse", "cost_markdown", "plot", "table2_rows", "table2_markdown", "write_outputs"]


def __getattr__(name: str):
    if name == "BASELINES":
        from efficient_attn.sweeps.cost import baselines

        return baselines()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
