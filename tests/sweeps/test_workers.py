"""Several processes for one sweep: claims, a shared RowStore, and --workers giving the rows one
process gives."""

import json
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from efficient_attn.report import RowStore
from efficient_attn.sweeps.claims import Claims


def test_a_claim_is_exclusive_while_its_process_lives_and_free_when_it_died(tmp_path):
    claims = Claims(tmp_path / "claims")
    other = [sys.executable, "-c", "import sys; from efficient_attn.sweeps.claims import Claims; "
             f"sys.exit(0 if Claims({str(tmp_path / 'claims')!r}).take('full|mqar|0') else 3)"]
    assert claims.take("full|mqar|0") and claims.take("full|mqar|0")  # re-taking one's own claim
    assert claims.owner("full|mqar|0") == os.getpid()
    assert subprocess.run(other).returncode == 3  # held by this live process
    claims.release("full|mqar|0")
    assert claims.owner("full|mqar|0") is None and not list((tmp_path / "claims").iterdir())
    assert subprocess.run(other).returncode == 0  # free again; that process died holding it
    assert claims.take("full|mqar|0")  # a dead process's claim file is no claim (the kernel dropped its lock)
    claims.release("full|mqar|0")


def _append(path, worker, n):
    store = RowStore(path)
    for i in range(n):
        store.add(f"w{worker}|{i}", {"worker": worker, "i": i, "history": ["x" * 200] * 40})  # ~8 KB lines


def test_rows_appended_by_several_processes_all_load(tmp_path):
    path = tmp_path / "rows.jsonl"
    procs = [multiprocessing.get_context("spawn").Process(target=_append, args=(path, w, 25)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    store = RowStore(path)
    assert len(store) == 75 and len(path.read_text().splitlines()) == 75
    mine = RowStore(path)
    _append(path, 9, 1)  # another writer after this store was loaded
    assert len(mine) == 75
    mine.refresh()
    assert len(mine) == 76 and mine.get("w9|0")["worker"] == 9


@pytest.mark.slow  # four tiny trainings in two workers, twice, and two in one process: about a minute
def test_two_workers_split_the_units_and_reproduce_their_rows(tmp_path):
    env = dict(os.environ, EA_CACHE_DIR=str(tmp_path / "cache"))
    base = [sys.executable, "-m", "efficient_attn.sweeps.accuracy", "--preset", "quick", "--variants",
            "full,linear", "--tasks", "mqar", "--steps", "3", "--no-progress"]

    def sweep(name, *extra):
        done = subprocess.run(base + ["--out", str(tmp_path / name), *extra], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        got = json.loads((tmp_path / name / "rows.json").read_text())["rows"]
        return done.stdout, {r["variant"]: r for r in got}

    log, two = sweep("two", "--workers", "2")
    assert re.search(r"\[worker 0\] \[\d+/", log) and re.search(r"\[worker 1\] \[\d+/", log)  # each trained one
    assert set(two) == {"full", "linear"} and {r["cores_used"] for r in two.values()} == {1}
    assert not list((tmp_path / "cache").rglob("*.claim"))  # every claim released
    _, again = sweep("again", "--workers", "2")
    _, one = sweep("one")
    for v in two:
        losses = [h["train_loss"] for h in two[v]["history"]]
        assert losses == [h["train_loss"] for h in again[v]["history"]]  # workers reproduce workers
        assert losses == pytest.approx([h["train_loss"] for h in one[v]["history"]], rel=1e-5)  # rounding apart


def test_the_parent_says_when_a_worker_did_not_finish_and_builds_the_workers_command():
    from efficient_attn.sweeps import workers
    from efficient_attn.sweeps.accuracy.cli import _child_argv

    assert workers.exit_status([0, 1]) is None  # the rows decide (1: a row errored)
    assert workers.exit_status([0, -15]) == 130 and workers.exit_status([130, 0]) == 130  # interrupted or killed
    assert workers.exit_status([0, 3]) == 1 and workers.exit_status([2, -9]) == 2  # crashed; a bad flag
    cmd = _child_argv(["--preset", "cpu", "--workers=2", "--out", "a", "--seeds", "0"], Path("b"))
    assert cmd[1:] == ["-m", "efficient_attn.sweeps.accuracy", "--preset", "cpu", "--seeds", "0", "--out", "b"]
    assert "--workers" not in _child_argv(["--workers", "3", "--out=x"], Path("x"))
