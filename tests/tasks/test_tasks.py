"""Tests of the task generators (efficient_attn/tasks): the data contract, determinism, and
each task's own law (ListOps values, Pathfinder connectivity, MQAR structure, bytes_lm splits),
plus the on-disk cache. Small sizes throughout."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from efficient_attn import tasks
from efficient_attn.tasks import bytes_lm, cache, listops, mqar, pathfinder
from efficient_attn.tasks.base import IGNORE

SMALL = {
    "listops": dict(seq_len=64, num_train=24, num_val=8, num_test=8),
    "pathfinder": dict(seq_len=256, num_train=8, num_val=4, num_test=4),
    "mqar": dict(seq_len=64, num_train=24, num_val=8, num_test=8, vocab_size=64, num_pairs=4),
    "bytes_lm": dict(seq_len=64, num_train=8, num_val=4, num_test=4),
    "selective_copy": dict(seq_len=48, num_train=24, num_val=8, num_test=8),
}
EXPECTED = {  # kind, causal, metric
    "listops": ("classify", False, "accuracy"),
    "pathfinder": ("classify", False, "accuracy"),
    "mqar": ("token", True, "accuracy"),
    "bytes_lm": ("token", True, "bits_per_byte"),
    "selective_copy": ("token", True, "accuracy"),
}


def _splits(data):
    return [data.train, data.val, data.test]


# ----------------------------------------------------------------------------- contract


def test_task_names():
    assert tasks.TASKS == ("listops", "pathfinder", "mqar", "bytes_lm", "selective_copy")
    assert set(SMALL) == set(EXPECTED) == set(tasks.TASKS)  # every task gets the contract tests below


@pytest.mark.parametrize("name", tasks.TASKS)
def test_contract_shapes_dtypes_ranges(name):
    args = SMALL[name]
    data = tasks.generate(name, seed=0, **args)
    kind, causal, metric = EXPECTED[name]
    assert (data.name, data.kind, data.causal, data.metric) == (name, kind, causal, metric)
    assert data.seq_len == args["seq_len"]
    for split, n in zip(_splits(data), (args["num_train"], args["num_val"], args["num_test"])):
        L = args["seq_len"]
        assert len(split) == n
        assert split.inputs.shape == (n, L) and split.inputs.dtype == np.int32
        assert split.mask.shape == (n, L) and split.mask.dtype == np.bool_
        assert split.inputs.min() >= 0 and split.inputs.max() < data.vocab_size
        if kind == "classify":
            assert split.targets.shape == (n,) and split.targets.dtype == np.int32
            assert split.targets.min() >= 0 and split.targets.max() < data.num_classes
        else:
            assert split.targets.shape == (n, L) and split.targets.dtype == np.int32
            scored = split.targets[split.targets != IGNORE]
            assert scored.size > 0 and scored.min() >= 0 and scored.max() < data.num_classes
            assert set(np.unique(split.targets[split.targets < 0])) <= {IGNORE}


@pytest.mark.parametrize("name", tasks.TASKS)
def test_deterministic_given_seed(name):
    a = tasks.generate(name, seed=5, **SMALL[name])
    b = tasks.generate(name, seed=5, **SMALL[name])
    c = tasks.generate(name, seed=6, **SMALL[name])
    for sa, sb, sc in zip(_splits(a), _splits(b), _splits(c)):
        np.testing.assert_array_equal(sa.inputs, sb.inputs)
        np.testing.assert_array_equal(sa.targets, sb.targets)
        np.testing.assert_array_equal(sa.mask, sb.mask)
    assert not np.array_equal(a.train.inputs, c.train.inputs)


def test_unknown_task_and_parameter_errors():
    with pytest.raises(ValueError, match="available tasks"):
        tasks.generate("nope", seq_len=8, num_train=1, num_val=0, num_test=0)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['depth'\].*max_depth"):
        tasks.generate("listops", seq_len=64, num_train=1, num_val=0, num_test=0, depth=3)
    with pytest.raises(ValueError, match="num_train"):
        tasks.generate("mqar", seq_len=64, num_train=0, num_val=0, num_test=0)
    assert "num_pairs" in tasks.parameters("mqar")


# ----------------------------------------------------------------------------- listops


def _evaluate(ids) -> tuple[int, int, int, int]:
    """Independent stack evaluator: (value, depth, fewest and most children) of a token row."""
    stack: list[tuple[int, list[int]]] = []
    result = None
    depth, widest, narrowest = 0, 0, 10**9
    for t in ids:
        t = int(t)
        if t == listops.PAD:
            break
        if listops.OP0 <= t < listops.OP0 + 4:
            stack.append((t - listops.OP0, []))
            depth = max(depth, len(stack))
        elif t == listops.CLOSE:
            op, args = stack.pop()
            widest, narrowest = max(widest, len(args)), min(narrowest, len(args))
            name = listops.OPERATORS[op]
            v = {
                "MIN": min(args),
                "MAX": max(args),
                "MED": int(np.median(args)),
                "SM": sum(args) % 10,
            }[name]
            if stack:
                stack[-1][1].append(v)
            else:
                assert result is None, "two top-level expressions"
                result = v
        else:
            d = t - listops.DIGIT0
            assert 0 <= d <= 9
            if stack:
                stack[-1][1].append(d)
            else:
                assert result is None
                result = d
    assert not stack and result is not None, "unbalanced expression"
    return result, depth + 1, narrowest, widest  # +1: the leaves' level


def test_listops_labels_match_independent_evaluator_and_tree_law():
    data = tasks.generate("listops", seq_len=128, num_train=150, num_val=25, num_test=25, seed=1, max_depth=6, max_args=5)
    assert data.params["min_length"] == 128 // 4
    seen = set()
    for split in _splits(data):
        for row, label, mask in zip(split.inputs, split.targets, split.mask):
            value, depth, narrowest, widest = _evaluate(row)
            assert value == label
            assert depth <= 6 and 2 <= narrowest and widest <= 5
            n = int(mask.sum())
            assert 32 < n < 128  # strictly between min_length and seq_len
            assert mask[:n].all() and not mask[n:].any() and (row[n:] == 0).all()
            seen.add(row.tobytes())
    assert len(seen) == 200, "samples must be distinct across all splits"
    assert len(set(data.train.targets.tolist())) > 5


def test_listops_operators_median_and_sum():
    assert listops.apply_op(2, [1, 2, 9, 9]) == 5 and listops.apply_op(2, [3, 1, 2]) == 2
    assert listops.apply_op(3, [9, 9, 3]) == 1
    assert listops.detokenize([12, 5, 15, 0]) == "[MAX 4 ]"


def test_listops_length_window_errors():
    with pytest.raises(ValueError, match="min_length"):
        tasks.generate("listops", seq_len=64, num_train=1, num_val=0, num_test=0, min_length=63)
    with pytest.raises(RuntimeError, match="distinct trees"):
        tasks.generate("listops", seq_len=64, num_train=5, num_val=0, num_test=0, max_attempts=3)


def test_listops_long_sequences_fast():
    t0 = time.perf_counter()
    data = tasks.generate("listops", seq_len=2000, num_train=100, num_val=0, num_test=0, seed=0, min_length=500)
    elapsed = time.perf_counter() - t0
    lengths = data.train.mask.sum(1)
    assert lengths.min() > 500 and lengths.max() < 2000
    assert elapsed < 20, f"100 LRA-length trees took {elapsed:.1f}s"


# ----------------------------------------------------------------------------- pathfinder


def test_segment_distance_matches_dense_sampling():
    gen = np.random.default_rng(0)
    p1, q1, p2, q2 = (gen.uniform(0, 10, size=(200, 2)) for _ in range(4))
    fast = pathfinder.segment_distance(p1, q1, p2, q2)
    t = np.linspace(0, 1, 801)[:, None, None]
    a = p1 + t * (q1 - p1)  # [801, 200, 2]
    b = p2 + t * (q2 - p2)
    naive = np.full(200, np.inf)
    for i in range(0, 801, 8):
        diff = a[i][None] - b  # [801, 200, 2]
        naive = np.minimum(naive, np.sqrt((diff**2).sum(-1)).min(0))
    assert np.all(fast <= naive + 1e-9)
    assert np.allclose(fast, naive, atol=0.05)


def _rasterise(scene, side, h=0.25):
    """Test-side raster of every snake's full polyline (gaps included) on an h-grid: cells whose
    centre lies within r of the centre line, r just below the bound that keeps two snakes
    ``clear`` apart from touching (8-neighbourhood)."""
    cfg = pathfinder.PathfinderConfig()
    clear = cfg.paddle_thickness + 2 * cfg.paddle_margin
    r = (clear - h * np.sqrt(2)) / 2 - 0.02
    n = int(side / h)
    c = (np.arange(n) + 0.5) * h
    pts = np.stack(np.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    occ = np.zeros(n * n, dtype=bool)
    for line in scene.snakes:
        d = pathfinder.point_segment_distance(pts[:, None], line[None, :-1], line[None, 1:]).min(1)
        occ |= d <= r
    return occ.reshape(n, n), h


def _flood(occ, start):
    reach = np.zeros_like(occ)
    reach[start] = True
    while True:
        grown = reach.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                shifted = np.zeros_like(reach)
                ys = slice(max(dy, 0), reach.shape[0] + min(dy, 0))
                yd = slice(max(-dy, 0), reach.shape[0] + min(-dy, 0))
                xs = slice(max(dx, 0), reach.shape[1] + min(dx, 0))
                xd = slice(max(-dx, 0), reach.shape[1] + min(-dx, 0))
                shifted[yd, xd] = reach[ys, xs]
                grown |= shifted
        grown &= occ
        if (grown == reach).all():
            return reach
        reach = grown


def test_pathfinder_markers_connected_iff_positive():
    cfg, scenes, labels = pathfinder.generate_scenes(
        pathfinder.PathfinderConfig(), seq_len=1024, num_train=12, num_val=0, num_test=0, seed=2
    )
    assert labels.sum() == 6
    for scene, label in zip(scenes, labels):
        assert scene.label == label
        i, j = scene.marker_snakes
        assert i in (0, 1) and j in (0, 1) and (i == j) == bool(label)
        np.testing.assert_allclose(scene.markers[0], scene.snakes[i][0])
        np.testing.assert_allclose(scene.markers[1], scene.snakes[j][-1])
        occ, h = _rasterise(scene, 32)
        a, b = (tuple((m / h).astype(int)) for m in scene.markers)
        assert occ[a] and occ[b]
        reached = _flood(occ, a)
        assert reached[b] == bool(label), f"label {label} but flood fill says {reached[b]}"


def test_pathfinder_same_paddle_count_and_rendered_markers():
    cfg, scenes, labels = pathfinder.generate_scenes(
        pathfinder.PathfinderConfig(), seq_len=1024, num_train=8, num_val=0, num_test=0, seed=3
    )
    expected = 2 * cfg.contour_length + cfg.num_distractors * cfg.distractor_length
    assert (cfg.contour_length, cfg.distractor_length, cfg.num_distractors, cfg.seed_distance) == (14, 4, 5, 7.0)
    for scene in scenes:
        assert len(scene.paddles(cfg.paddle_margin)) == expected
        assert [len(s) - 1 for s in scene.snakes] == [14, 14] + [4] * 5
        img = pathfinder.render(scene, cfg, 32)
        assert img.max() == 1.0 and img.min() == 0.0
        for m in scene.markers:
            assert img[int(m[0]), int(m[1])] > 0.5  # a marker is drawn at each end


def test_pathfinder_balanced_and_not_separable_by_ink():
    data = tasks.generate("pathfinder", seq_len=256, num_train=48, num_val=6, num_test=7, seed=4)
    assert data.train.targets.sum() == 24 and data.val.targets.sum() == 3 and data.test.targets.sum() == 3
    assert data.train.mask.all() and data.vocab_size == 256 and data.num_classes == 2
    ink = data.train.inputs.astype(float).sum(1)
    pos, neg = ink[data.train.targets == 1], ink[data.train.targets == 0]
    se = np.sqrt(pos.var() / len(pos) + neg.var() / len(neg))
    assert abs(pos.mean() - neg.mean()) < 4 * se


def test_pathfinder_arrays_are_the_checked_scenes_and_workers_agree(monkeypatch):
    args = dict(seq_len=256, num_train=96, num_val=16, num_test=16, seed=7)
    data = tasks.generate("pathfinder", **args)
    cfg, scenes, labels = pathfinder.generate_scenes(pathfinder.PathfinderConfig(), **args)
    inputs = np.concatenate([s.inputs for s in _splits(data)])
    np.testing.assert_array_equal(np.concatenate([s.targets for s in _splits(data)]), labels)
    for row, scene in zip(inputs[::9], scenes[::9]):
        np.testing.assert_array_equal(row, pathfinder.quantize(pathfinder.render(scene, cfg, 16), 256).ravel())
    monkeypatch.setenv("EA_TASK_WORKERS", "2")
    assert pathfinder._workers(128) == 2
    parallel = tasks.generate("pathfinder", **args)
    np.testing.assert_array_equal(np.concatenate([s.inputs for s in _splits(parallel)]), inputs)


def test_pathfinder_seq_len_must_be_square():
    with pytest.raises(ValueError, match="square"):
        tasks.generate("pathfinder", seq_len=1000, num_train=2, num_val=0, num_test=0)


# ----------------------------------------------------------------------------- mqar


def test_mqar_structure():
    P, V, L = 6, 128, 64
    data = tasks.generate("mqar", seq_len=L, num_train=40, num_val=5, num_test=5, seed=0, vocab_size=V, num_pairs=P)
    assert data.num_classes == V and data.vocab_size == V and data.train.mask.all()
    for split in _splits(data):
        for x, y in zip(split.inputs, split.targets):
            keys, values = x[0 : 2 * P : 2], x[1 : 2 * P : 2]
            assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
            assert len(set(keys)) == P and len(set(values)) == P
            assert (y[: 2 * P] == IGNORE).all()
            q = np.nonzero(y != IGNORE)[0]
            assert len(q) == P and ((q - 2 * P) % 2 == 0).all()
            assert sorted(x[q].tolist()) == sorted(keys.tolist())  # each key queried once
            lookup = dict(zip(keys.tolist(), values.tolist()))
            assert all(y[i] == lookup[int(x[i])] for i in q)


def test_mqar_requires_4p_le_seq_len():
    with pytest.raises(ValueError, match=r"4 \* num_pairs <= seq_len"):
        tasks.generate("mqar", seq_len=60, num_train=2, num_val=0, num_test=0, num_pairs=16)
    data = tasks.generate("mqar", seq_len=64, num_train=3, num_val=0, num_test=0, num_pairs=16)
    assert ((data.train.targets != IGNORE).sum(1) == 16).all()


def test_mqar_training_mixture_of_pair_counts():
    """train_num_pairs: training rows mix those pair counts (equal shares, each row a valid
    MQAR row with its own P); validation and test rows keep num_pairs; the default path is
    unchanged by the option's existence (same rows as without it)."""
    L, V = 64, 64
    data = tasks.generate("mqar", seq_len=L, num_train=30, num_val=6, num_test=6, seed=3, vocab_size=V,
                          num_pairs=8, train_num_pairs=(2, 4, 8))
    counts = (data.train.targets != IGNORE).sum(1)
    assert sorted(np.unique(counts, return_counts=True)[1].tolist()) == [10, 10, 10]
    assert set(counts.tolist()) == {2, 4, 8} and len(set(counts[:6].tolist())) > 1  # shuffled
    for x, y in zip(data.train.inputs, data.train.targets):
        q = np.nonzero(y != IGNORE)[0]
        P = len(q)
        lookup = dict(zip(x[0 : 2 * P : 2].tolist(), x[1 : 2 * P : 2].tolist()))
        assert all(y[i] == lookup[int(x[i])] for i in q)
    for split in (data.val, data.test):
        assert ((split.targets != IGNORE).sum(1) == 8).all()
    plain = tasks.generate("mqar", seq_len=L, num_train=30, num_val=6, num_test=6, seed=3, vocab_size=V, num_pairs=8)
    again = tasks.generate("mqar", seq_len=L, num_train=30, num_val=6, num_test=6, seed=3, vocab_size=V,
                           num_pairs=8, train_num_pairs=())
    np.testing.assert_array_equal(plain.train.inputs, again.train.inputs)
    with pytest.raises(ValueError, match="train_num_pairs"):
        tasks.generate("mqar", seq_len=L, num_train=4, num_val=0, num_test=0, num_pairs=8, train_num_pairs=(32,))
    with pytest.raises(ValueError, match="train_num_pairs"):
        tasks.generate("mqar", seq_len=L, num_train=4, num_val=0, num_test=0, num_pairs=8, train_num_pairs=(0,))


def test_mqar_zero_non_queries_option():
    """random_non_queries=False (Zoology's Figure 2 setting): the same pairs and queries, and
    token 0 everywhere else after the pairs; True (the default) fills those with random tokens."""
    P, V, L = 6, 64, 64
    kw = dict(seq_len=L, num_train=20, num_val=2, num_test=2, seed=1, vocab_size=V, num_pairs=P)
    zero = tasks.generate("mqar", random_non_queries=False, **kw)
    noisy = tasks.generate("mqar", **kw)
    for x, y in zip(zero.train.inputs, zero.train.targets):
        q = np.nonzero(y != IGNORE)[0]
        rest = np.setdiff1d(np.arange(2 * P, L), q)
        assert (x[rest] == 0).all() and (x[q] >= 1).all()
        lookup = dict(zip(x[0 : 2 * P : 2].tolist(), x[1 : 2 * P : 2].tolist()))
        assert all(y[i] == lookup[int(x[i])] for i in q)
    assert (noisy.train.inputs[:, 2 * P :] != 0).mean() > 0.5  # the default keeps random fillers
    with pytest.raises(ValueError, match="random_non_queries"):
        tasks.generate("mqar", random_non_queries="no", **kw)


def test_mqar_power_law_favours_short_gaps():
    def mean_gap(a):
        d = tasks.generate("mqar", seq_len=256, num_train=300, num_val=0, num_test=0, num_pairs=8, power_a=a)
        q = np.nonzero(d.train.targets != IGNORE)[1]
        return ((q - 16) // 2).mean()

    space = (256 - 16) // 2
    assert mean_gap(0.01) < 0.8 * mean_gap(1.0)
    assert abs(mean_gap(1.0) - (space - 1) / 2) < 5  # a = 1: uniform slots


def test_mqar_distinct_sampling_both_paths():
    gen = np.random.default_rng(0)
    for m, k in ((50, 5), (12, 10)):  # rejection path, Gumbel path
        rows = mqar._distinct_uniform(gen, 2000, m, k)
        assert rows.min() >= 0 and rows.max() < m
        assert all(len(set(r)) == k for r in rows.tolist())
        counts = np.bincount(rows.ravel(), minlength=m) / rows.size
        assert np.abs(counts - 1 / m).max() < 0.5 / m


# ----------------------------------------------------------------------------- bytes_lm


def test_bytes_lm_split_by_file_disjoint_and_stable(tmp_path):
    cfg = bytes_lm.BytesLMConfig()
    files = bytes_lm.split_files(cfg)
    sets = {k: set(v) for k, v in files.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert len(files["val"]) > 10 and len(files["test"]) > 10 and len(files["train"]) > 10 * len(files["val"])
    assert not any(("site-packages" in f) for f in files["train"])
    # stable across processes (sha256 of the path, not Python's salted hash())
    code = (
        "from efficient_attn.tasks import bytes_lm;"
        "import hashlib;f=bytes_lm.split_files(bytes_lm.BytesLMConfig());"
        "print(hashlib.sha256(repr(f).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": s}
        ).stdout.strip()
        for s in ("1", "2")
    }
    assert digests == {hashlib.sha256(repr(files).encode()).hexdigest()}


def test_bytes_lm_windows_come_from_their_split_files(tmp_path):
    # a synthetic corpus: file k holds only byte value k, so a window's bytes name its files
    owner = {}
    for k in range(1, 200):
        rel = f"pkg{k % 7}/mod_{k}.py"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(bytes([k]) * (50 + k))
        owner[k] = rel
    cfg = bytes_lm.BytesLMConfig(root=str(tmp_path), val_percent=20, test_percent=20)
    split_of = {k: bytes_lm.split_of(rel, cfg) for k, rel in owner.items()}
    data = tasks.generate("bytes_lm", seq_len=31, num_train=60, num_val=20, num_test=20, seed=0, root=str(tmp_path),
                          val_percent=20, test_percent=20)
    for name, split in zip(("train", "val", "test"), _splits(data)):
        full = np.concatenate([split.inputs, split.targets[:, -1:]], axis=1)
        assert {split_of[int(b)] for b in np.unique(full)} == {name}
        np.testing.assert_array_equal(split.inputs[:, 1:], split.targets[:, :-1])
    with pytest.raises(ValueError, match="windows"):
        tasks.generate("bytes_lm", seq_len=31, num_train=60, num_val=5000, num_test=1, root=str(tmp_path),
                       val_percent=20, test_percent=20)


def test_bytes_lm_on_stdlib():
    data = tasks.generate("bytes_lm", seq_len=128, num_train=16, num_val=4, num_test=4, seed=0)
    assert data.vocab_size == 256 and data.num_classes == 256 and data.metric == "bits_per_byte"
    assert data.train.mask.all()
    np.testing.assert_array_equal(data.train.inputs[:, 1:], data.train.targets[:, :-1])
    text = bytes(data.train.inputs[0].astype(np.uint8))
    assert text.count(b" ") > 5  # real source text
    assert data.params["files_read"]["train"] >= 1 and data.params["files"]["val"] > 0
    # a smaller stride: overlapping windows, each starting `stride` bytes after the previous
    dense = tasks.generate("bytes_lm", seq_len=128, num_train=16, num_val=4, num_test=4, seed=0, stride=16)
    np.testing.assert_array_equal(dense.train.inputs[1:, :112], dense.train.inputs[:-1, 16:])
    np.testing.assert_array_equal(dense.train.inputs[0], data.train.inputs[0])
    assert not np.array_equal(dense.train.inputs[1], data.train.inputs[1])


# ----------------------------------------------------------------------------- cache


def test_cache_hit_reuses_file(tmp_path, monkeypatch):
    args = dict(SMALL["mqar"], seed=0, cache_dir=tmp_path)
    first = tasks.load("mqar", **args)
    files = sorted(tmp_path.glob("mqar-*.npz"))
    assert len(files) == 1
    key, check = files[0].stem.split("-")[1:]
    assert len(key) == 16 and len(check) == 16

    def boom(*a, **k):
        raise AssertionError("generator called on a cache hit")

    monkeypatch.setattr(mqar, "generate", boom)
    second = tasks.load("mqar", **args)
    for a, b in zip(_splits(first), _splits(second)):
        np.testing.assert_array_equal(a.inputs, b.inputs)
        np.testing.assert_array_equal(a.targets, b.targets)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert b.inputs.dtype == np.int32 and b.mask.dtype == np.bool_
    assert (second.kind, second.causal, second.params) == (first.kind, first.causal, first.params)
    with pytest.raises(AssertionError, match="cache hit"):  # another parameter = another key
        tasks.load("mqar", **dict(args, seed=1))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_content"])
def test_cache_corrupt_file_regenerated(tmp_path, damage):
    args = dict(SMALL["listops"], seed=0, cache_dir=tmp_path)
    fresh = tasks.load("listops", **args)
    (path,) = tmp_path.glob("listops-*.npz")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    else:  # a valid npz whose content no longer matches the checksum in its name
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["train_targets"] = (arrays["train_targets"] + 1) % 10
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    with pytest.raises((ValueError, OSError, EOFError, zipfile.BadZipFile)):
        cache.read(path)
    again = tasks.load("listops", **args)
    np.testing.assert_array_equal(again.train.targets, fresh.train.targets)
    (new_path,) = tmp_path.glob("listops-*.npz")
    cache.read(new_path)  # the regenerated file is sound


def test_cache_default_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EA_CACHE_DIR", str(tmp_path / "c"))
    assert cache.default_dir() == tmp_path / "c"
    tasks.load("mqar", seed=0, **SMALL["mqar"])
    assert len(list((tmp_path / "c").glob("mqar-*.npz"))) == 1


def test_cache_file_with_out_of_range_token_refused_and_regenerated(tmp_path):
    """A cache file whose checksum matches but which holds a token id outside the task's
    vocabulary (a generator bug, or an edited file) is refused by ``cache.read`` with the task,
    split, id and place named, and ``load`` replaces it with sound regenerated data."""
    args = dict(SMALL["mqar"], seed=0, cache_dir=tmp_path)
    fresh = tasks.load("mqar", **args)
    (path,) = tmp_path.glob("mqar-*.npz")
    key = path.stem.split("-")[1]
    bad = cache.read(path)
    vocab = bad.vocab_size
    bad.val.inputs[2, 7] = vocab  # the arrays are writable: the TaskData check has already run
    path.unlink()
    bad_path = cache.save(bad, tmp_path, key)  # a self-consistent file: its checksum matches
    assert bad_path != path
    with pytest.raises(ValueError, match=rf"cache file .*'mqar', val split: token id {vocab} at index \(2, 7\)"):
        cache.read(bad_path)
    again = tasks.load("mqar", **args)
    assert not bad_path.exists()
    np.testing.assert_array_equal(again.val.inputs, fresh.val.inputs)
    (new_path,) = tmp_path.glob("mqar-*.npz")
    assert cache.read(new_path).val.inputs.max() < vocab


def test_task_data_refuses_ids_and_targets_outside_its_sizes():
    """Every TaskData (a generator's or the cache's) checks its arrays when made."""
    data = tasks.generate("listops", seed=0, **SMALL["listops"])

    def remake(split_name, field, value, where):
        split = getattr(data, split_name)
        arrays = {f: np.array(getattr(split, f)) for f in ("inputs", "targets", "mask")}
        arrays[field][where] = value
        return dataclasses.replace(data, **{split_name: dataclasses.replace(split, **arrays)})

    with pytest.raises(ValueError, match=r"'listops', train split: token id 16 at index \(3, 1\) is outside "
                                         r"\[0, vocab_size=16\)"):
        remake("train", "inputs", listops.VOCAB_SIZE, (3, 1))
    with pytest.raises(ValueError, match=r"test split: token id -1"):
        remake("test", "inputs", -1, (0, 0))
    with pytest.raises(ValueError, match=r"val split: target 10 at index \(1,\).*num_classes=10"):
        remake("val", "targets", 10, 1)
    lm = tasks.generate("mqar", seed=0, **SMALL["mqar"])
    assert (lm.train.targets == IGNORE).any()  # IGNORE is allowed in a token task's targets ...
    targets = lm.train.targets.copy()
    targets[0, 0] = -2  # ... and no other negative value
    with pytest.raises(ValueError, match=r"target -2 .* or IGNORE=-1"):
        dataclasses.replace(lm, train=dataclasses.replace(lm.train, targets=targets))
    with pytest.raises(ValueError, match="mask must be bool"):
        dataclasses.replace(data, val=dataclasses.replace(data.val, mask=data.val.mask.astype(np.int32)))
