"""Issue 12's promise, tried as a user would: ONE plugin file, loaded with ``--plugin``, appears in
``efficient-attn list`` and in the cost, accuracy and approximation tables with no other edit
(the conformance suite picks up tests/conformance/plugin_declared.py the same way). Each
command runs in a fresh process, as from a shell."""

from __future__ import annotations

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


def test_listed(plugin):
    out = _run("-m", "efficient_attn.cli", "list", "--plugin", str(plugin)).stdout
    assert NAME in out and "plugin" in out


def test_in_the_cost_table(plugin, tmp_path):
    _run("experiments/cost_scaling.py", "--plugin", str(plugin), "--variants", NAME, "--lengths", "32,64",
         "--passes", "fwd", "--no-table2", "--no-progress", "--out", str(tmp_path))
    assert f"| {NAME} |" in (tmp_path / "table.md").read_text()


def test_in_the_accuracy_table(plugin, tmp_path):
    _run("experiments/accuracy.py", "--preset", "quick", "--plugin", str(plugin), "--variants", NAME,
         "--tasks", "listops", "--seeds", "0", "--steps", "2", "--no-progress", "--out", str(tmp_path))
    assert NAME in (tmp_path / "table.md").read_text()


def test_in_the_approximation_table_with_its_declared_budget(plugin, tmp_path):
    _run("experiments/approximation.py", "--preset", "quick", "--plugin", str(plugin), "--variants", NAME,
         "--no-trained", "--no-progress", "--out", str(tmp_path))
    table = (tmp_path / "table.md").read_text()
    assert NAME in table and "window" in table  # its budget knob, declared at registration
