"""Kill and resume, for every experiment: SIGKILLed runs, rerun with the same command, end with
the tables of an uninterrupted run, having done each unit of work exactly once.

Each experiment runs as a subprocess through its real command line (``main(argv)`` of its
``cli``), at a tiny preset added to its ``PRESETS`` the way the presets modules allow, into a
tmp ``--out``: once uninterrupted (the reference, in parallel with the rest), and once as a
chain of kills: started, SIGKILLed once ``rows.jsonl`` holds ``k`` finished lines (``k`` and a
further delay drawn from a seeded ``random.Random``), rerun and killed again at a later point,
..., then rerun to the end. Three kill points per experiment; CI runs one case, the accuracy
experiment killed once (a RowStore like every other's, and the only one training a model per
row); the rest, its three-point case included, are marked slow (`make test-slow`). After some
kills the last line is cut in half,
as a kill in the middle of that append leaves it.

Checked after every kill and at the end: the kill landed mid-run (the process was still
alive); ``rows.jsonl`` is the file the previous kill left (minus the torn fragment) byte for
byte, followed by new units only, every line whole, no key twice (no finished unit was done
again), the torn unit redone first; the final run exits 0 with the reference's keys, and its
tables equal the reference's apart from the columns and lines that depend on timing, on the
machine's load or on the commit stamp, which each experiment names below (``*_TIMING``, the
table.md masks); everything else is compared exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- the experiments

# Each driver adds a preset "tiny" to the experiment's PRESETS and calls its command line.
COST_DRIVER = """
import sys
from efficient_attn.sweeps.cost.config import CostConfig, Table2Config
from efficient_attn.sweeps.cost.presets import PRESETS
# generous budgets: which points are skipped must not depend on this machine's load
PRESETS["tiny"] = CostConfig(
    preset="tiny", lengths=(16, 32), batch=1, heads=1, head_dim=8, warmup=0, min_repeats=1, max_repeats=2,
    repeat_budget_s=0.01, max_call_s=600.0, max_compile_s=600.0, sweep_budget_s=None, matmul_n=64,
    table2=Table2Config(lengths=(16,), batch=1, num_layers=1, emb_dim=8, num_heads=1, mlp_dim=8, warmup=0,
                        min_repeats=1, max_repeats=1, step_budget_s=0.01, max_step_s=600.0, budget_s=None))
from efficient_attn.sweeps.cost.cli import main
sys.exit(main(sys.argv[1:]))
"""

APPROX_DRIVER = """
import sys
from efficient_attn.sweeps.approximation.config import ApproxConfig, TrainedInput
from efficient_attn.sweeps.approximation.presets import PRESETS
PRESETS["tiny"] = lambda: ApproxConfig(
    preset="tiny", seq_len=16, num_heads=1, head_dim=8, batch=1, q_scales=(1.0,), seeds=(0,),
    causal=(False, True), budget_points=2, pattern_len=16, fast_compile=True,
    trained=TrainedInput(num_train=32, steps=2, num_layers=1, mlp_dim=16, task_params=(("max_depth", 2),)))
from efficient_attn.sweeps.approximation.cli import main
sys.exit(main(sys.argv[1:]))
"""

ACCURACY_DRIVER = """
import sys
from efficient_attn.sweeps.accuracy.config import AccuracyConfig, ModelSize, TaskSetting
from efficient_attn.sweeps.accuracy.presets import PRESETS
from efficient_attn.train import TrainConfig
PRESETS["tiny"] = lambda: AccuracyConfig(
    preset="tiny", seeds=(0,),
    tasks=(TaskSetting("mqar", 32, 32, 16, 16, ModelSize(num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32),
                       TrainConfig(lr=3e-3, warmup=1, steps=4, batch_size=8, eval_every=2, eval_batch_size=8),
                       (("vocab_size", 32), ("num_pairs", 4))),))
from efficient_attn.sweeps.accuracy.cli import main
sys.exit(main(sys.argv[1:]))
"""

DECODE_DRIVER = """
import sys
from efficient_attn.sweeps.decode_cost.config import DecodeCostConfig
from efficient_attn.sweeps.decode_cost.presets import PRESETS
# generous budgets: which points are skipped must not depend on this machine's load
PRESETS["tiny"] = DecodeCostConfig(
    preset="tiny", contexts=(8, 16, 32), batches=(1,), heads=1, head_dim=8, steps_per_call=2, warmup=0,
    min_repeats=1, max_repeats=2, repeat_budget_s=0.01, max_step_s=600.0, sweep_budget_s=None)
from efficient_attn.sweeps.decode_cost.cli import main
sys.exit(main(sys.argv[1:]))
"""

RECALL_DRIVER = """
import sys
from efficient_attn.sweeps.accuracy.config import ModelSize, TaskSetting
from efficient_attn.sweeps.recall.config import RecallConfig
from efficient_attn.sweeps.recall.presets import PRESETS
from efficient_attn.train import TrainConfig
PRESETS["tiny"] = lambda: RecallConfig(
    preset="tiny", widths=(8, 16), budget_width=None, seeds=(0,),
    task=TaskSetting("mqar", 32, 32, 16, 16, ModelSize(num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32),
                     TrainConfig(lr=3e-3, warmup=1, steps=4, batch_size=8, eval_every=2, eval_batch_size=8),
                     (("vocab_size", 32), ("num_pairs", 4), ("eval_num_pairs", (2, 4)))))
from efficient_attn.sweeps.recall.cli import main
sys.exit(main(sys.argv[1:]))
"""

# the command's own process starts the child that measures (with its simulated devices) and
# hands it this config: the kill lands on the command, as a user's would
SCALING_DRIVER = """
import sys
from efficient_attn.sweeps import scaling
scaling.PRESETS["tiny"] = lambda: scaling.ScalingConfig(
    "tiny", per_device=8, devices=(1, 2, 4), engines=("ring",), modes=("weak", "strong"), heads=1, head_dim=8,
    time_budget_s=0.01)
sys.exit(scaling.main(sys.argv[1:]))
"""


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    driver: str
    argv: tuple[str, ...]
    compare: Callable[[Path, Path], None]  # (reference out, resumed out): assert equal apart from timing
    # rows the tiny preset gives at least (the reference runs beside the kills, so these are
    # placed before its count is known); the resumed run must end with the reference's own keys
    min_rows: int
    kills: tuple[bool, ...]  # one per kill point of the chain: whether its last line is then torn
    folder: str = ""  # results/<folder>/tiny; the name when empty
    slow: bool = False  # marked slow: `make test-slow` runs it, CI does not

    @property
    def results(self) -> str:
        return self.folder or self.name


# ----------------------------------------------------------------------------- comparisons


def _csv(path: Path) -> tuple[list[str], list[dict]]:
    reader = csv.DictReader(io.StringIO(path.read_text()))
    return list(reader.fieldnames or []), list(reader)


def assert_csv_equal(ref: Path, got: Path, timing: frozenset[str]) -> None:
    """rows.csv: the same columns, and the same rows in the same order in every column but ``timing``."""
    ref_cols, ref_rows = _csv(ref)
    got_cols, got_rows = _csv(got)
    assert got_cols == ref_cols, f"{got}: columns differ"
    assert timing <= set(ref_cols), f"timing columns not in {ref.name}: {sorted(timing - set(ref_cols))}"
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    ref_rows, got_rows = strip(ref_rows), strip(got_rows)
    assert len(got_rows) == len(ref_rows), f"{got}: {len(got_rows)} rows, reference has {len(ref_rows)}"
    for i, (a, b) in enumerate(zip(ref_rows, got_rows)):
        diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
        assert not diff, f"{got.name} row {i} ({b.get('variant')}, n/task {b.get('n', b.get('task'))}): {diff}"


def assert_json_rows_equal(ref: Path, got: Path, timing: frozenset[str]) -> None:
    """rows.json apart from its environment stamp and the ``timing`` fields of each row."""
    a, b = json.loads(ref.read_text()), json.loads(got.read_text())
    assert sorted(a) == sorted(b)
    for key in a:
        if key == "environment":  # the commit stamp, load averages, the matmul ceiling
            continue
        if key == "rows":
            strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
            assert strip(b[key]) == strip(a[key]), f"{got}: rows differ beyond {sorted(timing)}"
        elif key == "growth_rows":  # decode_cost's interleaved growth rows: each has its own stamp
            strip = lambda rows: [{k: v for k, v in r.items() if k not in DECODE_GROWTH_TIMING}  # noqa: E731
                                  for r in rows]
            assert strip(b[key]) == strip(a[key]), f"{got}: growth rows differ beyond {sorted(DECODE_GROWTH_TIMING)}"
        else:
            assert b[key] == a[key], f"{got}: {key!r} differs"


# cost, rows.csv: measured times and what is derived from them (a rate, a fraction of the
# machine's matmul ceiling, a speed-up), the adaptive repeat count and the spread kind it
# decides, compile time, and the allocator's peak, which depends on what the process ran
# before. Compiled memory (memory_analysis) and FLOP counts are properties of the program
# and are compared.
COST_TIMING = frozenset({
    "time_median_s", "time_spread", "time_spread_kind", "time_min_s", "time_max_s", "repeats", "compile_s",
    "gflops_per_s", "matmul_gflops", "matmul_fraction", "steps_per_s", "speedup_vs_full", "device_peak_bytes",
})


def _md_skeleton(text: str) -> list[str]:
    """table.md's headings, and per table its header line and first (variant) column."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            out.append(line)
        elif line.startswith("| "):
            out.append(line if not out or not out[-1].startswith("|") else "| " + line.split(" | ")[0][2:])
    return out


def _md_sections(text: str, title_prefix: str) -> list[str]:
    """The tables that follow a line starting with ``title_prefix``, whole."""
    out, taking = [], False
    for line in text.splitlines():
        if line.startswith(title_prefix):
            taking = True
            out.append(line)
        elif taking and line.startswith("|"):
            out.append(line)
        elif taking and out and out[-1].startswith("|"):
            taking = False
    return out


def compare_cost(ref: Path, got: Path) -> None:
    assert_csv_equal(ref / "rows.csv", got / "rows.csv", COST_TIMING)
    assert_json_rows_equal(ref / "rows.json", got / "rows.json", COST_TIMING)
    # table.md: the header paragraph (matmul ceiling, load average), the time tables, the
    # speed-up and crossover tables and the slope notes come from timings; compared are the
    # headings, each table's header and variant column, and the memory tables in full.
    a, b = (ref / "table.md").read_text(), (got / "table.md").read_text()
    assert _md_skeleton(b) == _md_skeleton(a)
    memory = _md_sections(a, "Memory per call")
    assert memory and _md_sections(b, "Memory per call") == memory
    assert (got / "table2.md").exists() == (ref / "table2.md").exists()
    if (ref / "table2.md").exists():
        assert _md_skeleton((got / "table2.md").read_text()) == _md_skeleton((ref / "table2.md").read_text())


def compare_approximation(ref: Path, got: Path) -> None:
    # nothing in these outputs is timed: table.md and rows.csv are equal byte for byte
    for name in ("table.md", "rows.csv"):
        assert (got / name).read_text() == (ref / name).read_text(), f"{name} differs"
    assert_json_rows_equal(ref / "rows.json", got / "rows.json", frozenset())


# accuracy: seconds of compiling, training and evaluating (wall and CPU), and the rate derived from them
ACCURACY_CSV_TIMING = frozenset({"wall_s", "compile_s", "tokens_per_s", "cpu_s"})
# rows.json's rows also: train_wall_s, and the load average when the row finished (machine state)
ACCURACY_TIMING = ACCURACY_CSV_TIMING | {"train_wall_s", "load_1min"}


def _without_throughput(text: str) -> list[str]:
    """table.md without its throughput section (tokens/s and wall seconds) and its environment
    line (the commit stamp moves whenever anyone commits)."""
    out, skipping = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            skipping = line.startswith("## Throughput")
        if skipping or line.startswith("Environment: "):
            continue
        out.append(line)
    return out


def compare_accuracy(ref: Path, got: Path) -> None:
    assert_csv_equal(ref / "rows.csv", got / "rows.csv", ACCURACY_CSV_TIMING)
    assert_json_rows_equal(ref / "rows.json", got / "rows.json", ACCURACY_TIMING)
    # the Pareto note names the folder where it looked for cost results: each run's own
    a = (ref / "table.md").read_text().replace(str(ref.parents[2]), "<root>")
    b = (got / "table.md").read_text().replace(str(got.parents[2]), "<root>")
    assert "## Throughput and time" in a and "Environment: " in a  # the masked parts exist
    assert _without_throughput(b) == _without_throughput(a)


# decode_cost: the step's times and what follows from them (the adaptive repeat count and the
# spread kind it decides), and compile time. The state's bytes and the compiled step's
# temporaries are properties of the program and are compared.
DECODE_TIMING = frozenset({"step_median_s", "step_spread_s", "spread_kind", "repeats", "compile_s"})
# a growth row: the two interleaved step times, their ratio, compile time and its environment stamp
DECODE_GROWTH_TIMING = frozenset({"step_shortest_s", "step_longest_s", "growth", "compile_s", "environment"})


def compare_decode_cost(ref: Path, got: Path) -> None:
    assert_csv_equal(ref / "rows.csv", got / "rows.csv", DECODE_TIMING)
    assert_json_rows_equal(ref / "rows.json", got / "rows.json", DECODE_TIMING)
    # table.md: the latency tables (times, slopes, growth, speed-ups, crossovers), the goal
    # lines under them and the commit line come from timings or the commit; compared are the
    # headings, each table's header and variant column, the memory tables and the list of
    # points not measured, in full
    a, b = (ref / "table.md").read_text(), (got / "table.md").read_text()
    assert _md_skeleton(b) == _md_skeleton(a)
    for title in ("## State memory", "## Not measured"):
        assert _md_sections(b, title) == _md_sections(a, title), f"table.md: {title} differs"
    assert _md_sections(a, "## State memory"), "no memory table to compare"


# recall: seconds of training and evaluating (wall and CPU); rows.json's rows also the rate
# derived from them and the load average when the row finished (machine state)
RECALL_CSV_TIMING = frozenset({"wall_s", "cpu_s"})
RECALL_TIMING = RECALL_CSV_TIMING | {"tokens_per_s", "load_1min"}


def compare_recall(ref: Path, got: Path) -> None:
    assert_csv_equal(ref / "rows.csv", got / "rows.csv", RECALL_CSV_TIMING)
    assert_json_rows_equal(ref / "rows.json", got / "rows.json", RECALL_TIMING)
    assert (got / "task_info.json").read_text() == (ref / "task_info.json").read_text()
    # table.md holds no timing: all of it but the environment line (the commit stamp)
    a, b = (ref / "table.md").read_text(), (got / "table.md").read_text()
    assert "Environment: " in a and "| pairs=2 | pairs=4 |" in a  # the masked line exists; scores are tabled
    assert _without_throughput(b) == _without_throughput(a)


# scaling: the pass's times, the adaptive repeat count, compile time. Per-device compiled
# memory and the collective bytes (traced and by formula) are compared.
SCALING_TIMING = frozenset({"time_median_s", "time_spread_s", "repeats", "compile_s"})


def _md_without_columns(text: str, columns: frozenset[str], drop: Callable[[str], bool]) -> list[str]:
    """table.md with the cells of the named columns of every table left out, and the lines
    ``drop`` names."""
    out, keep = [], None
    for line in text.splitlines():
        if drop(line):
            continue
        if not line.startswith("|"):
            keep = None
            out.append(line)
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if keep is None:  # a table's header line
            keep = [i for i, c in enumerate(cells) if c not in columns]
        out.append(" | ".join(cells[i] for i in keep if i < len(cells)))
    return out


def compare_scaling(ref: Path, got: Path) -> None:
    assert_csv_equal(ref / "rows.csv", got / "rows.csv", SCALING_TIMING)
    assert_json_rows_equal(ref / "rows.json", got / "rows.json", SCALING_TIMING)
    # table.md: the time column of each table and the paragraph line with the commit stamp
    a, b = (ref / "table.md").read_text(), (got / "table.md").read_text()
    time_col, stamp = frozenset({"time (s, simulated)"}), lambda line: ", commit " in line
    headers = [line for line in a.splitlines() if line.startswith("| engine |")]
    assert len(headers) == 2 and all("| time (s, simulated) |" in h for h in headers)  # weak and strong tables
    assert sum(stamp(line) for line in a.splitlines()) == 1  # the masked line exists
    assert _md_without_columns(b, time_col, stamp) == _md_without_columns(a, time_col, stamp)


COMMON = ("--preset", "tiny", "--no-progress")
EXPERIMENTS = {
    # linformer has no causal mode: the sweeps plan around it (and say so) in every run.
    # cost: 6 kernel points (full 2 maskings, linformer 1, at 2 lengths) + 2 Table 2 points.
    "cost": Experiment("cost", COST_DRIVER, COMMON + ("--variants", "full,linformer", "--passes", "fwd"),
                       compare_cost, min_rows=8, kills=(False, True, True), slow=True),
    # approximation: Gaussian inputs both maskings + the trained model's, 2 budget values each
    "approximation": Experiment("approximation", APPROX_DRIVER, COMMON + ("--variants", "full,local,linformer"),
                                compare_approximation, min_rows=13, kills=(False, True, True), slow=True),
    # accuracy (the CI case): one trained model per row (linformer skipped on the causal task), one kill
    "accuracy": Experiment("accuracy", ACCURACY_DRIVER, COMMON + ("--variants", "full,local,linear,linformer"),
                           compare_accuracy, min_rows=3, kills=(True,)),
    # slow (not in CI; cost and approximation above too): the other experiments with a RowStore,
    # and accuracy at three kill points.
    # accuracy: two variants over three seeds, 6 trained models
    "accuracy_3_kills": Experiment("accuracy_3_kills", ACCURACY_DRIVER,
                                   COMMON + ("--variants", "full,local", "--seeds", "0,1,2"),
                                   compare_accuracy, min_rows=6, kills=(False, True, True), folder="accuracy",
                                   slow=True),
    # decode_cost: full's KV cache and linear's fixed state at 3 contexts, 6 points. min_rows
    # is one short, so each kill leaves at least three points (one a full compile) to go: a
    # linear step after its first is compiled already and takes milliseconds
    "decode_cost": Experiment("decode_cost", DECODE_DRIVER, COMMON + ("--variants", "full,linear"),
                              compare_decode_cost, min_rows=5, kills=(False, True, True), slow=True),
    # recall: one variant at 2 widths over 3 seeds, 6 trained models
    "recall": Experiment("recall", RECALL_DRIVER, COMMON + ("--variants", "full", "--seeds", "0,1,2"),
                         compare_recall, min_rows=6, kills=(False, True, True), slow=True),
    # scaling: the ring at P = 1, 2, 4, weak and strong, 6 rows (the kill lands on the command,
    # which must take its measuring child with it)
    "scaling": Experiment("scaling", SCALING_DRIVER, COMMON, compare_scaling, min_rows=6,
                          kills=(False, True, True), slow=True),
}

# ----------------------------------------------------------------------------- running


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, EA_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def _start(exp: Experiment, out: Path, cache: Path, log: Path) -> subprocess.Popen:
    # results/<experiment>/<preset> layout: the accuracy Pareto plot looks for ../../cost/<preset>,
    # absent here in the reference and in the resumed run alike
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-c", exp.driver, *exp.argv, "--out", str(out)], cwd=REPO,
                                env=_env(cache), stdout=f, stderr=subprocess.STDOUT)


def _run(exp: Experiment, out: Path, cache: Path, log: Path, timeout: float = 600.0) -> None:
    _wait(exp, _start(exp, out, cache, log), log, timeout)


def _wait(exp: Experiment, proc: subprocess.Popen, log: Path, timeout: float = 600.0) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, f"{exp.name} exited {rc}:\n{log.read_text()[-3000:]}"


def _records(path: Path) -> tuple[list[bytes], bytes]:
    """The finished lines of a rows.jsonl (with their newlines) and the unterminated tail."""
    data = path.read_bytes() if path.exists() else b""
    *lines, tail = data.split(b"\n")
    return [line + b"\n" for line in lines], tail


def _key(line: bytes) -> str:
    return json.loads(line)["key"]


def kill_after_rows(exp: Experiment, out: Path, cache: Path, log: Path, k: int, delay_s: float,
                    timeout: float = 600.0) -> None:
    """Start the experiment and SIGKILL it ``delay_s`` after rows.jsonl holds ``k`` finished lines."""
    proc = _start(exp, out, cache, log)
    rows = out / "rows.jsonl"
    t0 = time.monotonic()
    try:
        while len(_records(rows)[0]) < k:
            assert proc.poll() is None, (f"{exp.name} ended (exit {proc.returncode}) before writing {k} rows:\n"
                                         f"{log.read_text()[-3000:]}")
            assert time.monotonic() - t0 < timeout, f"{exp.name}: {k} rows not written within {timeout} s"
            time.sleep(0.02)
        time.sleep(delay_s)
        assert proc.poll() is None, f"{exp.name} finished before the kill point ({k} rows + {delay_s:.2f} s)"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check_resumed_store(kept: list[bytes], torn_key: str | None, lines: list[bytes], what: str) -> None:
    """``lines`` (rows.jsonl after a later run) extend ``kept`` (what the earlier kill left, torn
    fragment removed) unchanged, hold no key twice, and redo the torn unit first."""
    assert b"".join(lines).startswith(b"".join(kept)), f"{what}: rows finished before the kill were rewritten"
    keys = [_key(x) for x in lines]  # every line is a whole record: the torn fragment was cut off
    done_again = sorted({x for x in keys if keys.count(x) > 1})
    assert not done_again, f"{what}: units done twice: {done_again}"
    if torn_key is not None and len(lines) > len(kept):
        assert keys[len(kept)] == torn_key, f"{what}: the torn unit is not the first one redone"


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if e.slow else [])
                                  for n, e in EXPERIMENTS.items()])
def test_killed_runs_resume_to_the_uninterrupted_tables(name, tmp_path):
    exp = EXPERIMENTS[name]
    tears = exp.kills
    assert exp.min_rows >= len(tears) + 2, "too few rows for the kill points"
    # the uninterrupted reference runs beside the chain of kills (they share nothing but the code)
    ref_root = tmp_path / "reference"
    ref = ref_root / "results" / exp.results / "tiny"
    ref_proc = _start(exp, ref, ref_root / "cache", ref_root / "log.txt")
    try:
        chain_of_kills(exp, tmp_path / "killed", tears)
    except BaseException:
        ref_proc.kill()
        ref_proc.wait()
        raise
    _wait(exp, ref_proc, ref_root / "log.txt")
    out = tmp_path / "killed" / "results" / exp.results / "tiny"
    ref_lines, ref_tail = _records(ref / "rows.jsonl")
    ref_keys = [_key(x) for x in ref_lines]
    assert not ref_tail and len(set(ref_keys)) == len(ref_keys), "the reference run's store"
    assert len(ref_keys) >= exp.min_rows, f"the tiny preset now gives {len(ref_keys)} rows: lower min_rows"
    lines, _ = _records(out / "rows.jsonl")
    assert sorted(_key(x) for x in lines) == sorted(ref_keys)
    exp.compare(ref, out)


def chain_of_kills(exp: Experiment, root: Path, tears: tuple[bool, ...]) -> None:
    """Run, kill, rerun, kill, ..., rerun to the end, checking the store after each kill and at the end."""
    rng = random.Random(exp.name)
    out, cache, log = root / "results" / exp.results / "tiny", root / "cache", root / "log.txt"
    rows = out / "rows.jsonl"
    kept: list[bytes] = []
    torn_key = None
    last = exp.min_rows - 2  # kill with at least two units left, so the run cannot finish first
    for i, tear in enumerate(tears):
        # the i-th kill point: in the i-th of len(tears) equal windows of [1, last], past what is done
        lo, hi = 1 + i * last // len(tears), (i + 1) * last // len(tears)
        k = min(max(rng.randint(lo, max(lo, hi)), len(kept) + 1), last)
        kill_after_rows(exp, out, cache, log, k, delay_s=rng.uniform(0.0, 0.15))
        lines, _ = _records(rows)
        check_resumed_store(kept, torn_key, lines, f"kill {i + 1} (after {k} rows)")
        assert len(lines) >= k, f"kill {i + 1}: {len(lines)} rows after the kill at {k}"
        kept, torn_key = lines, None
        if tear:  # the kill came in the middle of the last append: half of that line is on disk
            torn_key = _key(kept[-1])
            rows.write_bytes(b"".join(kept[:-1]) + kept[-1][: len(kept[-1]) // 2])
            kept = kept[:-1]

    _run(exp, out, cache, log)  # the same command, to the end

    lines, tail = _records(rows)
    assert not tail, "rows.jsonl ends in an unterminated line"
    check_resumed_store(kept, torn_key, lines, "the final run")
