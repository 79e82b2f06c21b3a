"""report.py: atomic writes, the resumable RowStore, tables; results_index; the registry table."""

import json

from efficient_attn import report
from efficient_attn.results_index import write_results_readme
from efficient_attn.sweeps.reproduce import write_registry_table


def test_write_atomic_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "t.md"
    report.write_atomic(p, "one")
    report.write_atomic(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in p.parent.iterdir()] == ["t.md"]  # no temporary left behind


def test_rowstore_resumes_and_ignores_torn_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    s = report.RowStore(path)
    s.add("a|1", {"x": 1.0})
    s.add("b|2", {"x": float("nan")})
    with open(path, "a") as f:
        f.write('{"key": "c|3", "row": {"x"')  # a kill in the middle of a write
    s2 = report.RowStore(path)
    assert s2.has("a|1") and s2.has("b|2") and not s2.has("c|3")
    assert s2.get("b|2") == {"x": None}  # non-finite numbers become null, valid JSON
    s3 = report.RowStore(path, force=True)
    assert len(s3) == 0


def test_markdown_table_and_csv(tmp_path):
    md = report.markdown_table(["a", "b"], [[1, 0.123456], ["x|y", None]])
    assert md.splitlines()[2] == "| 1 | 0.123 |"
    assert "x\\|y" in md and "| - |" in md
    report.write_csv(tmp_path / "r.csv", [{"a": 1, "b": 2}, {"a": 3, "c": 4}])
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b,c", "1,2,", "3,,4"]


def test_environment_fields():
    env = report.environment("quick")
    for key in ("jax", "flax", "backend", "device", "cpu", "cpu_cores", "commit", "preset"):
        assert key in env
    json.dumps(env)


def test_results_readme_embeds_tables(tmp_path):
    write_registry_table(tmp_path)
    (tmp_path / "cost" / "quick").mkdir(parents=True)
    (tmp_path / "cost" / "quick" / "table.md").write_text("# Cost\n\n| a |\n|---|\n| 1 |\n")
    (tmp_path / "cost" / "quick" / "time.png").write_bytes(b"png")
    out = write_results_readme(tmp_path, "quick")
    text = out.read_text()
    assert "## Cost" in text and "| 1 |" in text  # heading demoted, table embedded
    assert "(cost/quick/time.png)" in text
    assert "blockwise" in text  # the registry table
    assert "Not run yet" in text  # the missing experiments are said to be missing
