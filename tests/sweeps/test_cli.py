"""The experiments' shared command line: bad values refused in one line naming the flag, exit 2."""

import io
from pathlib import Path

import pytest

import efficient_attn as ea
from efficient_attn.sweeps import cli

PRESETS = {"quick": None, "cpu": None}


def _parser():
    return cli.experiment_parser("exp", "an experiment", presets=PRESETS, tasks=True, seeds=True, steps=True)


def _refused(capsys, argv, *needles, parse=None):
    """Parse ``argv``; assert exit status 2 and ONE stderr line holding every needle."""
    with pytest.raises(SystemExit) as exc:
        (parse or (lambda a: cli.parse(_parser(), a)))(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err
    return lines[0]


def test_defaults_leave_the_preset_alone():
    args = cli.parse(_parser(), [])
    assert args.preset == "quick" and args.plugin == [] and not args.force and not args.no_progress
    assert args.variants is None and args.tasks is None and args.seeds is None and args.steps is None
    assert args.out is None


def test_values_come_back_parsed():
    args = cli.parse(_parser(), ["--preset", "cpu", "--variants", " full, local ,", "--tasks", "mqar",
                                 "--seeds", "0,2", "--steps", "5", "--out", "x/y", "--force", "--no-progress"])
    assert args.preset == "cpu" and args.variants == ("full", "local") and args.tasks == ("mqar",)
    assert args.seeds == (0, 2) and args.steps == 5 and args.out == Path("x/y")
    assert args.force and args.no_progress


@pytest.mark.parametrize("argv, needles", [
    (["--steps", "0"], ["--steps", "positive integer", "'0'"]),
    (["--steps", "-1"], ["--steps", "positive integer", "'-1'"]),
    (["--steps", "ten"], ["--steps", "'ten'"]),
    (["--seeds", "x"], ["--seeds", "non-negative integers", "'x'"]),
    (["--seeds", "0,-1"], ["--seeds", "'0,-1'"]),
    (["--seeds", ","], ["--seeds"]),
    (["--variants", ","], ["--variants", "at least one"]),
    (["--tasks", " , "], ["--tasks", "at least one"]),
    (["--preset", "huge"], ["--preset", "'huge'"]),
    (["--plugin", "no/such/file.py"], ["--plugin", "does not exist"]),
])
def test_bad_values_are_one_line_naming_the_flag(capsys, argv, needles):
    line = _refused(capsys, argv, *needles)
    assert line.startswith("exp: error: ")


def test_unknown_variant_names_the_flag_and_the_close_matches(capsys):
    line = _refused(capsys, ["--variants", "full,locl"], "--variants", "'locl'", "did you mean", "local")
    assert "known:" in line


def test_plugin_directory_and_non_python_file(capsys, tmp_path):
    _refused(capsys, ["--plugin", str(tmp_path)], f"--plugin: {tmp_path} is a directory, expected a .py file")
    text = tmp_path / "notes.txt"
    text.write_text("")
    _refused(capsys, ["--plugin", str(text)], "--plugin", "is not a .py file")


def test_broken_plugin_is_one_line_naming_the_file(capsys, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('half-written plugin')\n")
    _refused(capsys, ["--plugin", str(broken)], "--plugin", "broken.py", "RuntimeError: half-written plugin")


def test_a_plugin_registers_names_before_variants_are_checked(tmp_path):
    plugin = tmp_path / "cli_plugin.py"
    plugin.write_text(
        "import dataclasses\nimport efficient_attn as ea\n"
        "@dataclasses.dataclass(frozen=True)\nclass Cfg:\n    pass\n"
        "@ea.register('_cli_test_plugin', config=Cfg)\n"
        "class P(ea.Attention):\n    capabilities = ea.Capabilities()\n"
        "    def attend(self, q, k, v, mask):\n        return v\n"
    )
    try:
        args = cli.parse(_parser(), ["--plugin", str(plugin), "--variants", "_cli_test_plugin"])
        assert args.variants == ("_cli_test_plugin",)
    finally:
        ea.registry.unregister("_cli_test_plugin")


def test_check_choices(capsys):
    p = _parser()
    cli.check_choices(p, "--tasks", ["mqar"], ["listops", "mqar"], what="task")
    _refused(capsys, None, "--tasks: unknown task 'mqr'", "did you mean mqar",
             parse=lambda _: cli.check_choices(p, "--tasks", ["mqar", "mqr"], ["listops", "mqar"], what="task"))


def test_flags_only_where_asked():
    bare = cli.experiment_parser("exp", "x", presets=PRESETS)
    args = cli.parse(bare, [])
    assert not hasattr(args, "seeds") and not hasattr(args, "tasks") and not hasattr(args, "steps")
    with pytest.raises(SystemExit):
        bare.parse_args(["--steps", "3"])
    with pytest.raises(ValueError, match="default preset"):
        cli.experiment_parser("exp", "x", presets=PRESETS, default_preset="lra")


def test_int_list_minimum_and_positive_float(capsys):
    p = cli.ExperimentParser(prog="exp")
    p.add_argument("--lengths", type=cli.int_list("--lengths", minimum=1))
    p.add_argument("--budget", type=cli.positive_float)
    args = p.parse_args(["--lengths", "256,1024", "--budget", "2.5"])
    assert args.lengths == (256, 1024) and args.budget == 2.5
    _refused(capsys, ["--lengths", "0,256"], "--lengths", "positive integers", parse=p.parse_args)
    for bad in ("0", "-1", "nan", "inf", "x"):
        _refused(capsys, ["--budget", bad], "--budget", "positive number", parse=p.parse_args)


def test_exit_status_is_nonzero_when_any_row_errored():
    out = io.StringIO()
    assert cli.exit_status([{"status": "ok"}, None, {"status": "skipped"}], "exp", file=out) == 0
    assert out.getvalue() == ""
    rows = [{"variant": "full", "task": "mqar", "seed": 0, "status": "ok"},
            {"variant": "local", "task": "mqar", "seed": 1, "status": "error", "reason": "RuntimeError: kaput"}]
    assert cli.exit_status(rows, "exp", file=out) == 1
    text = out.getvalue()
    assert "exp: 1 row(s) errored" in text and "variant=local task=mqar seed=1: RuntimeError: kaput" in text
    assert "full" not in text


# issue 13 item 10: the accuracy experiment refuses these before anything is loaded or trained
@pytest.mark.parametrize("argv, needles", [
    (["--steps", "0"], ["--steps", "positive integer"]),  # was read as "no override": 60 steps
    (["--steps", "-1"], ["--steps", "positive integer"]),
    (["--variants", ","], ["--variants", "at least one"]),
    (["--seeds", "x"], ["--seeds", "'x'"]),
    (["--variants", "nosuch"], ["--variants", "unknown variant 'nosuch'", "known: ", "full"]),
    (["--variants", "full,perfomer"], ["--variants", "'perfomer'", "did you mean performer"]),
    (["--tasks", "imagenet"], ["--tasks", "imagenet", "the quick preset has", "mqar"]),
    (["--preset", "huge"], ["--preset", "'huge'"]),
])
def test_accuracy_refuses_bad_flags(capsys, argv, needles):
    from efficient_attn.sweeps import accuracy

    line = _refused(capsys, argv, *needles, parse=accuracy.main)
    assert line.startswith("efficient-attn train: error: ")


def test_accuracy_refuses_a_plugin_directory(capsys, tmp_path):
    from efficient_attn.sweeps import accuracy

    _refused(capsys, ["--plugin", str(tmp_path)], f"--plugin: {tmp_path} is a directory, expected a .py file",
             parse=accuracy.main)


def test_accuracy_script_exits_nonzero_with_one_line(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "experiments" / "accuracy.py"
    res = subprocess.run([sys.executable, str(script), "--steps", "0", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == ["efficient-attn train: error: --steps: expected a positive "
                                               "integer, got '0'"]
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("command", ["list", "reproduce"])
def test_list_and_reproduce_refuse_a_bad_plugin_in_one_line(capsys, tmp_path, command):
    """``efficient-attn list`` and ``reproduce`` take --plugin through the shared parser: a missing
    file, a directory or a file that fails to import is one line naming the flag, exit 2, and
    reproduce runs no step (nothing is written under --results)."""
    from efficient_attn import cli as front

    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('half-written plugin')\n")
    results = tmp_path / "results"
    extra = ["--results", str(results)] if command == "reproduce" else []
    for bad, needles in [(tmp_path / "missing.py", ["does not exist"]), (tmp_path, ["is a directory"]),
                         (broken, ["could not load", "RuntimeError: half-written plugin"])]:
        line = _refused(capsys, [command, "--plugin", str(bad), *extra], "--plugin", *needles, parse=front.main)
        assert line.startswith(f"{'efficient-attn list' if command == 'list' else 'experiments/reproduce.py'}: error:")
    assert not results.exists()
    if command == "reproduce":
        _refused(capsys, ["reproduce", "--only", "nosuch", *extra], "--only", "'nosuch'", parse=front.main)
