"""The command line every experiment shares: its common flags, their validation, the exit status.

An experiment builds its parser here, adds its own flags, and parses through ``parse``, which
loads ``--plugin`` files before it checks ``--variants`` (a plugin may register the names)::

    from efficient_attn.sweeps import cli

    def main(argv=None) -> int:
        p = cli.experiment_parser("efficient-attn train", "Accuracy of every variant on every task.",
                                  presets=PRESETS, tasks=True, seeds=True, steps=True)
        p.add_argument("--lengths", type=cli.int_list("--lengths", minimum=1))   # its own flags
        args = cli.parse(p, argv)
        cfg = PRESETS[args.preset]()
        if args.variants is not None:                       # a tuple of registered names
            cfg = dataclasses.replace(cfg, variants=args.variants)
        if args.tasks is not None:                          # checked against the preset here
            cli.check_choices(p, "--tasks", args.tasks, [t.task for t in cfg.tasks])
        rows = run(cfg, args.out or default_out, force=args.force, progress=not args.no_progress)
        return cli.exit_status(rows, "accuracy")            # 1 when any row has status "error"

Flags (each only where the experiment asks for it; the first six always):

    --preset NAME        one of the experiment's presets (default ``quick``)
    --variants A,B       registered variant names (default: every registered variant)
    --plugin FILE.py     a Python file that registers variants; repeatable
    --force              recompute finished rows
    --out DIR            output folder (default: the experiment's ``results/<experiment>/<preset>``)
    --no-progress        no progress bar (log lines instead)
    --tasks A,B          task names of the preset              (tasks=True)
    --seeds 0,1,2        non-negative integer seeds            (seeds=True)
    --steps N            training steps, N >= 1                (steps=True)
    --mesh data=2,seq=4  train on that device mesh: the batch over "data", the attention
                         sequence-parallel over "seq" (``train.TrainConfig.mesh``)  (mesh=True)

``--mesh`` is checked in ``parse``: only the axes "data" and "seq", and sizes whose product is
``jax.device_count()``; on a CPU, simulated devices are asked for before the command starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=8 efficient-attn train --mesh data=2,seq=4``).

A bad value is refused with one line naming the flag, e.g. ``efficient-attn train: error:
--seeds: expected comma-separated non-negative integers, got 'x'``, and exit status 2 (as
``argparse``'s own errors), before anything is computed. Values come back parsed: ``variants``,
``tasks`` as tuples of names, ``seeds`` as a tuple of ints, ``out`` as a ``Path``, ``mesh`` as
its one spelling (``"data=2,seq=4"``); an absent flag is ``None`` so that the preset's value stands.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from efficient_attn import registry

__all__ = [
    "ExperimentParser",
    "experiment_parser",
    "parse",
    "name_list",
    "int_list",
    "positive_int",
    "positive_float",
    "plugin_file",
    "mesh_spec",
    "mesh_device_problem",
    "mesh_folder",
    "check_choices",
    "exit_status",
]


class ExperimentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: message``) and exit 2.

    The usage block argparse prints before an error is left out: the message names the flag,
    and ``--help`` shows the rest.
    """

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_flag_first(message)}\n")


def _flag_first(message: str) -> str:
    # argparse words its own errors "argument --seeds: ..."; ours lead with the flag alone.
    return message[len("argument "):] if message.startswith("argument --") else message


def name_list(flag: str) -> Callable[[str], tuple[str, ...]]:
    """A ``type=`` for comma-separated names: at least one, blanks dropped, order kept."""

    def parse_names(text: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        if not names:
            raise argparse.ArgumentTypeError(f"expected at least one comma-separated name, got {text!r}")
        return names

    parse_names.__name__ = flag.lstrip("-")
    return parse_names


def int_list(flag: str, *, minimum: int = 0) -> Callable[[str], tuple[int, ...]]:
    """A ``type=`` for comma-separated integers, each at least ``minimum``; at least one."""
    kind = "non-negative integers" if minimum == 0 else (
        "positive integers" if minimum == 1 else f"integers >= {minimum}")

    def parse_ints(text: str) -> tuple[int, ...]:
        parts = [x.strip() for x in text.split(",") if x.strip()]
        try:
            values = tuple(int(x) for x in parts)
        except ValueError:
            values = ()
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {text!r}")
        return values

    parse_ints.__name__ = flag.lstrip("-")
    return parse_ints


def positive_int(text: str) -> int:
    """A ``type=`` for an integer >= 1 (``--steps 0`` is refused rather than read as "unset")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A ``type=`` for a finite number > 0 (seconds, budgets)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0.0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def mesh_spec(text: str) -> str:
    """A ``type=`` for ``--mesh``: a training mesh spec (``train.mesh_axes``), given back in
    one spelling (``"data=2, seq=4"`` -> ``"data=2,seq=4"``)."""
    from efficient_attn.parallel.mesh import format_mesh
    from efficient_attn.train import mesh_axes

    try:
        return format_mesh(mesh_axes(text))
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def mesh_folder(preset: str, meshes) -> str:
    """``<preset>``, or ``<preset>_mesh_<axes>`` for runs on meshes (``"data=2,seq=4"`` ->
    ``quick_mesh_data2_seq4``): the default results folder of a run on a mesh, beside the preset's."""
    meshes = sorted(set(meshes) - {None})
    return preset + ("_mesh_" + "_".join(meshes).replace("=", "").replace(",", "_") if meshes else "")


def mesh_device_problem(spec: str) -> str | None:
    """Why ``spec`` cannot run in this process (its sizes do not multiply to
    ``jax.device_count()``), as one line naming ``--mesh`` and the fix; None when it can."""
    import math

    import jax

    from efficient_attn.parallel.mesh import parse_mesh

    need, have = math.prod(parse_mesh(spec).values()), jax.device_count()
    if need == have:
        return None
    return (f"--mesh {spec}: needs {need} devices, this process has {have}; on a CPU, simulate them by starting the "
            f"command with XLA_FLAGS=--xla_force_host_platform_device_count={need} (set before jax starts), "
            f"or choose sizes whose product is {have}")


def plugin_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a .py file")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist, expected a .py file")
    if path.suffix != ".py":
        raise argparse.ArgumentTypeError(f"{text} is not a .py file")
    return path


def experiment_parser(
    prog: str | None,
    description: str,
    *,
    presets: Mapping[str, Any] | Sequence[str],
    default_preset: str = "quick",
    tasks: bool = False,
    seeds: bool = False,
    steps: bool = False,
    mesh: bool = False,
) -> ExperimentParser:
    """A parser with the shared flags (module docstring); the experiment adds its own after."""
    names = sorted(presets)
    if default_preset not in names:
        raise ValueError(f"default preset {default_preset!r} is not one of {names}")
    p = ExperimentParser(prog=prog, description=description)
    p.add_argument("--preset", choices=names, default=default_preset,
                   help=f"named configuration (default {default_preset})")
    p.add_argument("--variants", type=name_list("--variants"), metavar="A,B",
                   help="comma-separated variant names (default: every registered variant)")
    if tasks:
        p.add_argument("--tasks", type=name_list("--tasks"), metavar="A,B",
                       help="comma-separated task names (default: the preset's)")
    if seeds:
        p.add_argument("--seeds", type=int_list("--seeds"), metavar="0,1",
                       help="comma-separated non-negative integer seeds (default: the preset's)")
    if steps:
        p.add_argument("--steps", type=positive_int, metavar="N",
                       help="override every task's training steps, N >= 1 (smoke runs)")
    if mesh:
        p.add_argument("--mesh", type=mesh_spec, metavar="data=2,seq=4",
                       help="train on this device mesh: the batch split over 'data', the attention run "
                            "sequence-parallel over 'seq' (sizes multiply to the device count)")
    p.add_argument("--plugin", action="append", default=[], type=plugin_file, metavar="FILE.py",
                   help="a Python file that registers variants (repeatable)")
    p.add_argument("--force", action="store_true", help="recompute finished rows")
    p.add_argument("--out", type=Path, metavar="DIR", help="output directory (default results/<experiment>/<preset>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``, check ``--mesh`` against the devices, load the ``--plugin`` files, then
    check ``--variants`` against the registry."""
    args = parser.parse_args(argv)
    mesh = getattr(args, "mesh", None)
    if mesh is not None and (problem := mesh_device_problem(mesh)):
        parser.error(problem)
    for path in getattr(args, "plugin", None) or []:
        try:
            registry.load_plugin(path)
        except Exception as err:  # a plugin's own bug: name the file and the error, no traceback
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            parser.error(f"--plugin: could not load {path}: {type(err).__name__}: {first}")
    variants = getattr(args, "variants", None)
    if variants is not None:
        check_choices(parser, "--variants", variants, registry.list_variants(), what="variant")
    return args


def check_choices(parser: argparse.ArgumentParser, flag: str, values: Iterable[str], known: Sequence[str],
                  *, what: str = "name") -> None:
    """Refuse (one line, exit 2) any of ``values`` not in ``known``, naming the close matches."""
    known = list(known)
    for value in values:
        if value in known:
            continue
        close = difflib.get_close_matches(value, known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        parser.error(f"{flag}: unknown {what} {value!r}; {hint}known: {', '.join(known)}")


def _describe(row: Mapping[str, Any]) -> str:
    parts = [f"{k}={row[k]}" for k in ("variant", "task", "n", "pass", "budget", "seed") if k in row]
    return " ".join(parts) or "row"


def exit_status(rows: Iterable[Mapping[str, Any] | None], experiment: str, *, file=None) -> int:
    """0, or 1 after one line on stderr per failure when any row has ``status == "error"``.

    ``main`` returns it, so that a sweep whose rows errored exits non-zero (``make reproduce``
    and CI see it) while the other rows are kept and the tables still written.
    """
    file = file if file is not None else sys.stderr
    errors = [r for r in rows if r and r.get("status") == "error"]
    if not errors:
        return 0
    print(f"{experiment}: {len(errors)} row(s) errored (rerun the same command to retry them):", file=file)
    for r in errors:
        print(f"  {_describe(r)}: {r.get('reason') or 'no reason recorded'}", file=file)
    return 1
