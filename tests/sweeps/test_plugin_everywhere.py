"""Issue 12's promise, tried as a user would: ONE plugin file, loaded with ``--plugin``, appears in
``efficient-attn list`` and in the cost, accuracy and approximation tables with no other edit
(the conformance suite picks up tests/conformance/plugin_declared.py the same way). Each
command runs in a fresh process, as from a shell."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests" / "conformance" / "plugin_declared.py"
NAME = "plugin_band"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """The conformance plugin copied to a user's folder: nothing in the repository points at it."""
    path = tmp_path_factory.mktemp("user") / "my_band_attention.py"
    shutil.copy(PLUGIN, path)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table as its rows of cells, the header first (separator rows dropped)."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|---"):
            continue
        if line.startswith("| "):
            current.append([c.strip() for c in line.strip()[1:-1].split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def _declared_budget(path: Path) -> tuple[str, tuple]:
    """The (knob, values) of the file's ``ea.Budget(...)`` declaration, read from its source
    (importing it would register the plugin in this test process too)."""
    calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", getattr(n.func, "id", None)) == "Budget"]
    (call,) = calls
    return ast.literal_eval(call.args[0]), ast.literal_eval(call.args[1])


def _number(cell: str) -> float | None:
    """The leading number of a cell ("17.5", "0.946 ± 0.0793"); None for "-", "n/a [1]", "skip"."""
    try:
        return float(cell.split()[0])
    except (ValueError, IndexError):
        return None


def test_listed(plugin):
    out = _run("-m", "efficient_attn.cli", "list", "--plugin", str(plugin)).stdout
    lines = out.splitlines()
    header = lines[0].split()
    rows = [line.split() for line in lines if line.split()[:1] == [NAME]]
    assert len(rows) == 1, out
    assert rows[0][header.index("family")] == "plugin"  # the default family of a plugin


def test_in_the_cost_table(plugin, tmp_path):
    _run("experiments/cost_scaling.py", "--plugin", str(plugin), "--variants", NAME, "--lengths", "32,64",
         "--passes", "fwd", "--no-table2", "--no-progress", "--out", str(tmp_path))
    assert f"| {NAME} |" in (tmp_path / "table.md").read_text()


def test_in_the_accuracy_table(plugin, tmp_path):
    _run("experiments/accuracy.py", "--preset", "quick", "--plugin", str(plugin), "--variants", NAME,
         "--tasks", "listops", "--seeds", "0", "--steps", "2", "--no-progress", "--out", str(tmp_path))
    (scores,) = [t for t in _tables((tmp_path / "table.md").read_text()) if "ListOps (acc %)" in t[0]]
    (row,) = [r for r in scores if r[0] == NAME]
    cell = row[scores[0].index("ListOps (acc %)")]
    score = _number(cell)
    assert score is not None and 0.0 <= score <= 100.0, cell  # a test accuracy, not "n/a" or "-"


def test_in_the_approximation_table_with_its_declared_budget(plugin, tmp_path):
    _run("experiments/approximation.py", "--preset", "quick", "--plugin", str(plugin), "--variants", NAME,
         "--no-trained", "--no-progress", "--out", str(tmp_path))
    knob, values = _declared_budget(PLUGIN)
    rows = [r for t in _tables((tmp_path / "table.md").read_text()) if t[0][:2] == ["variant", "setting"]
            for r in t if r[0] == NAME]
    assert rows, "no plugin_band row in the approximation table"
    for row in rows:  # | plugin_band | window=4 | err ... |: the declared knob at a declared value
        name, _, value = row[1].partition("=")
        assert name == knob and int(value) in values, row
        err = _number(row[2])
        assert err is not None and err >= 0.0, row
