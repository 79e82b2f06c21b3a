"""``make reproduce``: every experiment at one preset, then ``results/README.md``.

    python experiments/reproduce.py --preset quick     # CPU, about 10 minutes on 2 cores
    python experiments/reproduce.py --preset cpu       # CPU, hours
    python experiments/reproduce.py --preset lra       # an accelerator, LRA's configurations

Steps, in order (each resumable; finished rows are kept unless ``--force``):
  1. the registry table                          results/registry.md
  2. exact attention side by side                results/exact/
  3. cost against N (and the Table 2 analog)     results/cost/<preset>/
  4. accuracy on the tasks (Table 1 analog)      results/accuracy/<preset>/
  5. approximation error against "full"          results/approximation/<preset>/
  6. the index                                   results/README.md
A step that fails is reported and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path

from efficient_attn import report
from efficient_attn.sweeps import cli

PRESETS = ("quick", "cpu", "lra")
EXPERIMENTS = (
    ("exact", "efficient_attn.sweeps.exact"),
    ("cost", "efficient_attn.sweeps.cost"),
    ("decode_cost", "efficient_attn.sweeps.decode_cost"),
    ("accuracy", "efficient_attn.sweeps.accuracy"),
    ("approximation", "efficient_attn.sweeps.approximation"),
)


def write_registry_table(results: Path) -> None:
    from efficient_attn.cli import REGISTRY_HEADERS, registry_rows

    text = "# Registered variants\n\nWritten by `efficient-attn list` / `make reproduce`.\n\n"
    text += report.markdown_table(REGISTRY_HEADERS, registry_rows())
    report.write_atomic(results / "registry.md", text)


def _experiment_args(name: str, preset: str, results: Path, force: bool, plugins: list[str]) -> list[str]:
    if name == "exact":
        # one folder at every preset (results/README.md embeds results/exact/table.md); beyond
        # quick the kernels' preset adds the N = 65536 forward+backward (its "huge" preset)
        args = ["--preset", "quick" if preset == "quick" else "huge", "--out", str(results / "exact")]
    else:
        args = ["--preset", preset, "--out", str(results / name / preset)]
    if not sys.stdout.isatty():
        args.append("--no-progress")  # a log file gets the per-row lines, not carriage-return bars
    if force:
        args.append("--force")
    for p in plugins:
        args += ["--plugin", p]
    return args


def _parser() -> cli.ExperimentParser:
    p = cli.ExperimentParser(prog="experiments/reproduce.py",
                             description="Run every experiment at one preset, then rebuild results/README.md.")
    p.add_argument("--preset", choices=PRESETS, default="quick")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--only", nargs="+", choices=[n for n, _ in EXPERIMENTS], help="run only these experiments")
    p.add_argument("--force", action="store_true", help="recompute finished rows")
    p.add_argument("--plugin", action="append", default=[], type=cli.plugin_file, metavar="FILE.py",
                   help="a Python file that registers variants (repeatable; passed on to every experiment)")
    return p


def main(argv: list[str] | None = None) -> int:
    # a bad flag or a plugin that does not load: one line naming the flag, exit 2, before any step runs
    args = cli.parse(_parser(), argv)
    args.plugin = [str(path) for path in args.plugin]
    results = args.results
    write_registry_table(results)
    failures = []
    for name, module_name in EXPERIMENTS:
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        print(f"\n=== {name} ({args.preset}) ===", flush=True)
        try:
            module = importlib.import_module(module_name)
            rc = module.main(_experiment_args(name, args.preset, results, args.force, args.plugin))
            if rc:
                failures.append(f"{name}: exit status {rc}")
        except Exception:  # keep going: one broken experiment must not hide the others' results
            traceback.print_exc()
            failures.append(f"{name}: {traceback.format_exc(limit=1).strip().splitlines()[-1]}")
        print(f"=== {name} done in {time.perf_counter() - t0:.0f} s ===", flush=True)

    from efficient_attn.results_index import write_results_readme

    write_results_readme(results, args.preset)
    print(f"\nwrote {results / 'README.md'}")
    if failures:
        print("FAILED steps:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0
