"""``efficient-attn``: the command line.

    efficient-attn list [--plugin FILE]      the registry as a table
    efficient-attn bench ...                 the cost experiment (sweeps/cost/; --help for options)
    efficient-attn train ...                 the accuracy experiment (sweeps/accuracy/)
    efficient-attn approx ...                the approximation experiment (sweeps/approximation/)
    efficient-attn reproduce [--preset P]    all three, then results/README.md
"""

from __future__ import annotations

import importlib
import sys

from efficient_attn import registry
from efficient_attn.allocator import reexec_with_tuned_allocator

_SUBCOMMANDS = {
    "bench": "efficient_attn.sweeps.cost",
    "train": "efficient_attn.sweeps.accuracy",
    "approx": "efficient_attn.sweeps.approximation",
    "reproduce": "efficient_attn.sweeps.reproduce",
}


def registry_rows() -> list[list[str]]:
    rows = []
    for name in registry.list_variants():
        spec = registry.get_spec(name)
        c = spec.capabilities
        yn = lambda b: "yes" if b else "no"  # noqa: E731
        rows.append([name, spec.family, yn(c.causal), yn(c.cross), yn(c.kv_mask), yn(c.exact), c.time, c.memory,
                     spec.citation])
    return rows


REGISTRY_HEADERS = ["name", "family", "causal", "cross", "kv_mask", "exact", "time", "memory", "citation"]


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _shared_flags():
    """The experiments' shared command line (``sweeps/cli.py``: one-line errors naming the flag,
    exit 2), reached by name at call time as the subcommands are, so that this front end adds
    no import of the sweeps to the library's modules (tests/test_layers.py)."""
    return importlib.import_module("efficient_attn.sweeps.cli")


def _list(argv: list[str]) -> int:
    shared = _shared_flags()
    p = shared.ExperimentParser(prog="efficient-attn list", description="Print the registry as a table.")
    p.add_argument("--plugin", action="append", default=[], type=shared.plugin_file, metavar="FILE.py",
                   help="a Python file that registers variants (repeatable)")
    shared.parse(p, argv)  # loads the plugins; a file that fails to load is one line naming --plugin
    print(format_table(REGISTRY_HEADERS, registry_rows()))
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the console script: measure under the tuned allocator (efficient_attn/allocator.py)
        reexec_with_tuned_allocator()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "list":
        return _list(rest)
    if command in _SUBCOMMANDS:
        module = importlib.import_module(_SUBCOMMANDS[command])
        return int(module.main(rest) or 0)
    print(f"efficient-attn: unknown command {command!r}; commands: list, {', '.join(_SUBCOMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
