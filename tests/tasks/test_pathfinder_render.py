"""Pathfinder pictures a person can look at: PNGs of both classes, read back and compared.

Written to pytest's tmp dir; with ``EA_KEEP_PNG=1`` also to ``results/pathfinder_examples/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib import image as mpimg

from efficient_attn import tasks
from efficient_attn.tasks import pathfinder


def _outdirs(tmp_path: Path) -> list[Path]:
    dirs = [tmp_path]
    if os.environ.get("EA_KEEP_PNG"):
        dirs.append(Path(__file__).resolve().parents[2] / "results" / "pathfinder_examples")
    return dirs


def test_png_round_trip_exact(tmp_path):
    tokens = np.arange(256, dtype=np.int32).reshape(16, 16)
    path = pathfinder.render_png(tokens.ravel(), tmp_path / "ramp.png", levels=256)
    back = mpimg.imread(path)  # PNG -> float in [0, 1]
    assert back.shape == (16, 16)
    np.testing.assert_array_equal(np.rint(back * 255).astype(int), tokens)
    scaled = mpimg.imread(pathfinder.render_png(tokens, tmp_path / "ramp4.png", levels=256, scale=4))
    assert scaled.shape == (64, 64)
    np.testing.assert_array_equal(np.rint(scaled[::4, ::4] * 255).astype(int), tokens)


def test_write_examples_of_both_classes(tmp_path):
    data = tasks.generate("pathfinder", seq_len=1024, num_train=16, num_val=0, num_test=0, seed=0)
    x, y = data.train.inputs, data.train.targets
    for out in _outdirs(tmp_path):
        for label, name in ((1, "connected"), (0, "disconnected")):
            rows = x[y == label]
            assert len(rows) == 8
            grid = pathfinder.render_grid_png(rows, out / f"pathfinder32_{name}.png", ncols=4, scale=4, levels=256)
            sheet = mpimg.imread(grid)
            assert sheet.shape == (2 * 33 * 4 + 4, 4 * 33 * 4 + 4)
            first = sheet[4 : 4 + 32 * 4 : 4, 4 : 4 + 32 * 4 : 4]  # the first tile, unscaled
            np.testing.assert_array_equal(np.rint(first * 255).astype(int), rows[0].reshape(32, 32))
            single = pathfinder.render_png(rows[0], out / f"pathfinder32_{name}_0.png", scale=8, levels=256)
            assert single.stat().st_size > 100
