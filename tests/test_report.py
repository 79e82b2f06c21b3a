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


def _lines(path):
    return path.read_bytes().split(b"\n")


def test_rowstore_torn_line_is_pending_and_cut_off_at_the_next_add(tmp_path):
    path = tmp_path / "rows.jsonl"
    s = report.RowStore(path)
    s.add("a|1", {"x": 1})
    s.add("b|2", {"x": 2})
    whole = path.read_bytes()
    torn = json.dumps({"key": "c|3", "row": {"x": 3}})[:-7]  # the kill came mid-write
    with open(path, "ab") as f:
        f.write(torn.encode())
    s2 = report.RowStore(path)
    assert [s2.has(k) for k in ("a|1", "b|2", "c|3")] == [True, True, False]  # the torn unit is pending
    assert path.read_bytes() == whole + torn.encode()  # loading alone changes nothing on disk
    s2.add("c|3", {"x": 3})  # redone
    s2.add("d|4", {"x": 4})
    # repaired: the fragment is gone, so the redone row is a line of its own, not glued to it
    assert path.read_bytes().startswith(whole) and torn.encode() not in path.read_bytes().split(b"\n")
    lines = _lines(path)
    assert lines[-1] == b"" and [json.loads(x)["key"] for x in lines[:-1]] == ["a|1", "b|2", "c|3", "d|4"]
    s3 = report.RowStore(path)  # the next resume sees the redone unit: it is not done a third time
    assert s3.rows() == [{"x": 1}, {"x": 2}, {"x": 3}, {"x": 4}]


def test_rowstore_whole_last_record_without_newline_is_kept_and_terminated(tmp_path):
    path = tmp_path / "rows.jsonl"
    report.RowStore(path).add("a|1", {"x": 1})
    with open(path, "ab") as f:  # cut just before its newline: the record itself is complete
        f.write(json.dumps({"key": "b|2", "row": {"x": 2}}).encode())
    s = report.RowStore(path)
    assert s.has("b|2") and s.get("b|2") == {"x": 2}
    s.add("c|3", {"x": 3})
    assert [json.loads(x)["key"] for x in _lines(path)[:-1]] == ["a|1", "b|2", "c|3"]
    assert len(report.RowStore(path)) == 3


def test_rowstore_torn_file_holding_only_a_fragment_and_damaged_middle_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"key": "a|1", "ro')  # killed during the very first append
    s = report.RowStore(path)
    assert len(s) == 0
    s.add("a|1", {"x": 1})
    assert path.read_bytes() == b'{"key": "a|1", "row": {"x": 1}}\n'
    # a line fused by an older writer, a blank line, a non-record and invalid UTF-8: skipped
    with open(path, "ab") as f:
        f.write(b'{"key": "b|2", "row": {"x"{"key": "c|3", "row": {"x": 3}}\n\n[1, 2]\n\xff\xfe\n')
        f.write(b'{"key": "d|4", "row": {"x": 4}}\n')
    assert report.RowStore(path).rows() == [{"x": 1}, {"x": 4}]


def test_rowstore_keeps_rows_as_a_reload_reads_them(tmp_path):
    path = tmp_path / "rows.jsonl"
    s = report.RowStore(path)
    s.add("a|1", {"t": (1, 2), "nan": float("nan"), "inf": float("inf"), "d": {3: "x"}})
    want = {"t": [1, 2], "nan": None, "inf": None, "d": {"3": "x"}}
    assert s.get("a|1") == want and report.RowStore(path).get("a|1") == want
    s.add("a|1", {"t": 2})  # a retried unit: the newer row wins, in the key's first place
    s.add("b|2", {"t": 3})
    assert s.rows() == report.RowStore(path).rows() == [{"t": 2}, {"t": 3}]


def test_markdown_table_and_csv(tmp_path):
    md = report.markdown_table(["a", "b"], [[1, 0.123456], ["x|y", None]])
    assert md.splitlines()[2] == "| 1 | 0.123 |"
    assert "x\\|y" in md and "| - |" in md
    report.write_csv(tmp_path / "r.csv", [{"a": 1, "b": 2}, {"a": 3, "c": 4}])
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b,c", "1,2,", "3,,4"]


def test_read_stored_json_round_trips_and_treats_missing_or_torn_files_as_empty(tmp_path):
    assert report.read_stored_json(tmp_path) == {}  # no rows.json yet
    report.write_json(tmp_path / "rows.json", {"config": {"preset": "cpu", "seeds": (0, 1)}, "skipped": []})
    assert report.read_stored_json(tmp_path) == {"config": {"preset": "cpu", "seeds": [0, 1]}, "skipped": []}
    (tmp_path / "rows.json").write_text('{"config": {"pre')  # torn by a kill mid-write
    assert report.read_stored_json(tmp_path) == {}
    (tmp_path / "rows.json").write_text("[1, 2]")  # valid JSON, not an outputs object
    assert report.read_stored_json(tmp_path) == {}


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
    assert "Accuracy at the cpu preset" not in text  # a long run not started is not announced
    (tmp_path / "accuracy" / "cpu").mkdir(parents=True)
    (tmp_path / "accuracy" / "cpu" / "table.md").write_text("# Accuracy (cpu preset)\n\n| full | 100.0 |\n")
    text = write_results_readme(tmp_path, "quick").read_text()
    assert "## Accuracy at the cpu preset" in text and "| full | 100.0 |" in text
    assert text.count("| full | 100.0 |") == 1 == write_results_readme(tmp_path, "cpu").read_text().count(
        "| full | 100.0 |")  # at the cpu preset it is the section itself, not twice


def test_results_readme_embeds_a_long_runs_notes(tmp_path):
    folder = tmp_path / "recall" / "cpu"
    folder.mkdir(parents=True)
    (folder / "table.md").write_text("# Recall\n\n| full | 99.9 |\n")
    text = write_results_readme(tmp_path, "quick").read_text()
    assert "| full | 99.9 |" in text and "finding holds" not in text
    (folder / "NOTES.md").write_text("# Recall: notes\n\nThe finding holds.\n")
    text = write_results_readme(tmp_path, "quick").read_text()
    assert "## Recall: notes" in text and "The finding holds." in text


def test_sweep_store_starts_empty_only_for_the_preset_as_defined(tmp_path):
    """``force`` wipes the store when the config is its preset exactly (a full rerun); a
    narrowed config, a preset given as a factory or a name no preset has keeps every row."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        preset: str
        variants: tuple = ("a", "b")

    path = tmp_path / "rows.jsonl"
    report.RowStore(path).add("a|1", {"x": 1})
    presets = {"quick": Cfg("quick"), "cpu": lambda: Cfg("cpu")}
    for cfg in (Cfg("quick", ("a",)), Cfg("cpu", ("b",)), Cfg("other")):
        assert report.sweep_store(path, cfg, presets, force=True).has("a|1"), cfg
    assert report.sweep_store(path, Cfg("quick"), presets, force=False).has("a|1")
    assert len(report.sweep_store(path, Cfg("cpu"), presets, force=True)) == 0  # the factory's config
    report.RowStore(path).add("a|1", {"x": 1})
    assert len(report.sweep_store(path, Cfg("quick"), presets, force=True)) == 0
