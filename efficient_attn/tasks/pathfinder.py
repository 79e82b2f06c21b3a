"""Pathfinder (Linsley et al. 2018, "Learning long-range spatial dependencies with horizontal
gated recurrent units"), re-implemented in numpy; LRA's Pathfinder-32 task (Tay et al. 2020).

An image holds two long *target* contours, a few short *distractor* contours and two round
markers. Question: do the two markers sit on the same contour? (label 1) or on the two
different target contours? (label 0). Pixels are quantised to ``levels`` grey levels and the
image is read row by row as ``side * side`` tokens (``seq_len`` must be a square).

Contours ("snakes") are chains of short straight *paddles*. In continuous pixel coordinates a
snake is the polyline a_0, b_0, b_1, ..., b_{K-1}: the first piece a_0 -> b_0 is a paddle of
length ``paddle_length``; every later piece b_{k-1} -> b_k has length ``paddle_margin +
paddle_length`` and is drawn only on its last ``paddle_length`` (a dashed contour whose gaps
are ``paddle_margin`` wide). Growth, as in the original generator:

- direction: the turn d between consecutive pieces is drawn from ``num_turns`` angles evenly
  spaced in [-90, 90] degrees with weight cos^2(min(|d| * continuity, 90 deg)) (the original's
  continuity weighting: larger ``continuity`` = straighter contours), restricted to the
  candidates that keep the clearances below; no admissible candidate = the snake fails;
- clearance: every piece stays at least ``paddle_thickness + 2 * paddle_margin`` (centre line
  to centre line) from every piece of every other snake and from the pieces of its own snake
  other than its predecessor; the four ends of the target snakes (where markers may go) stay
  ``marker_radius + paddle_thickness / 2 + paddle_margin`` from other snakes and
  ``2 * marker_radius + paddle_margin`` from each other; all points stay ``padding + 0.5``
  inside the border. So contours never touch, and connectivity is unambiguous;
- the two target snakes start from seeds ``seed_distance`` apart (random direction) and grow
  alternately to ``contour_length`` paddles each; then ``num_distractors`` snakes of
  ``distractor_length`` paddles are seeded at random free places (a scene that cannot be
  completed is redrawn whole, so every image has exactly the same number of paddles).

Markers (disks of radius ``marker_radius``): one on the origin end of target snake i
(i uniform in {0, 1}); the other on the far end of snake i (label 1) or of snake 1 - i
(label 0). **Why pixel counts cannot solve it:** the scene (both target snakes, all
distractors) is drawn before, and independently of, the label; the label only decides which
of the two far ends receives the second marker. Both classes therefore have the same paddle
count (2 * contour_length + num_distractors * distractor_length, identical in every image),
the same two markers, and the same distribution of everything except that one choice.
Labels are exactly balanced in each split (an odd split has one extra negative).

Rendering: each pixel is supersampled ``antialias`` x ``antialias``; a sub-sample at distance
d from the nearest paddle centre line gets coverage clip((thickness/2 + 0.5/s - d) * s, 0, 1)
(s = antialias), times ``paddle_contrast``; markers likewise with the disk; the image is the
maximum of the two, divided by its maximum (as the original normalises), then quantised.

Parameters: the defaults are the Pathfinder-32 values LRA used (padding 1, paddle length 2,
thickness 0.5, marker radius 1.5, contour length 14, antialias 2, seed distance 7,
continuity 1.0, distractor length 14 // 3 = 4, 20 // 4 = 5 distractors, snake contrast 2 x
paddle contrast 0.75 = 1.5); ``paddle_margin`` = 1 and 19 candidate turns are this
re-implementation's choices. For an image side other than 32 the unset lengths scale (ours,
not a published setting; r = side / 32): for side >= 32, contour_length = round(14 r) and
num_distractors = int(20 r^2 / distractor_length) (contours as long relative to the image,
the same ink density); below 32, round(14 r^2) and int(20 r^3 / distractor_length), because
the clearances are absolute and a 16 x 16 image cannot hold longer contours without making
scene completion slow; always contour_length >= 3, distractor_length = max(1,
contour_length // 3), seed_distance = max(7 r, 2 marker_radius + paddle_margin + 0.5).
(16 x 16 gives contours of 4 paddles and 2 single-paddle distractors.) Path-X's geometry
(marker radius 3, thickness 1.5, seed distance 20, continuity 1.8) can be passed explicitly.

Cost: O(pieces x candidates x pieces) per scene for the clearance tests plus
O(side^2 antialias^2 paddles) to render; see the tests/report for measured times.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from efficient_attn.core import check_config, check_positive_int
from efficient_attn.tasks.base import TaskData
from efficient_attn.tasks.common import three_splits

NAME = "pathfinder"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class PathfinderConfig:
    """Generator parameters in pixels of the final image (None = LRA's value, scaled to the side)."""

    padding: int = 1
    paddle_length: float = 2.0
    paddle_margin: float = 1.0
    paddle_thickness: float = 0.5
    marker_radius: float = 1.5
    contour_length: int | None = None
    distractor_length: int | None = None
    num_distractors: int | None = None
    seed_distance: float | None = None
    continuity: float = 1.0
    antialias: int = 2
    paddle_contrast: float = 1.5
    levels: int = 256
    num_turns: int = 19
    max_scene_attempts: int = 500

    def __post_init__(self):
        check_positive_int(NAME, "padding", self.padding, minimum=0)
        for field in ("paddle_length", "paddle_thickness", "marker_radius", "continuity", "paddle_contrast"):
            value = getattr(self, field)
            check_config(NAME, isinstance(value, (int, float)) and value > 0, f"{field} must be > 0, got {value!r}")
        check_config(
            NAME,
            isinstance(self.paddle_margin, (int, float)) and self.paddle_margin >= 0,
            f"paddle_margin must be >= 0, got {self.paddle_margin!r}",
        )
        for field in ("contour_length", "distractor_length"):
            if getattr(self, field) is not None:
                check_positive_int(NAME, field, getattr(self, field), minimum=2 if field == "contour_length" else 1)
        if self.num_distractors is not None:
            check_positive_int(NAME, "num_distractors", self.num_distractors, minimum=0)
        if self.seed_distance is not None:
            check_config(
                NAME,
                isinstance(self.seed_distance, (int, float)) and self.seed_distance > 0,
                f"seed_distance must be > 0, got {self.seed_distance!r}",
            )
        check_positive_int(NAME, "antialias", self.antialias)
        check_positive_int(NAME, "levels", self.levels, minimum=2)
        check_positive_int(NAME, "num_turns", self.num_turns, minimum=2)
        check_positive_int(NAME, "max_scene_attempts", self.max_scene_attempts)

    def resolve(self, side: int) -> "PathfinderConfig":
        """Fill the side-dependent defaults (LRA's Pathfinder-32 values, scaled for other sides)."""
        scale = side / 32.0
        if side >= 32:  # contours grow with the side, distractor ink with the area
            contour_default, distractor_ink = 14 * scale, 20 * scale**2
        else:  # small images: sparser, or the clearances make scenes hard to complete
            contour_default, distractor_ink = 14 * scale**2, 20 * scale**3
        contour = self.contour_length if self.contour_length is not None else max(3, round(contour_default))
        dlen = self.distractor_length if self.distractor_length is not None else max(1, contour // 3)
        ndis = self.num_distractors if self.num_distractors is not None else int(distractor_ink / dlen)
        sd = self.seed_distance
        if sd is None:
            sd = max(7.0 * scale, 2 * self.marker_radius + self.paddle_margin + 0.5)
        return dataclasses.replace(
            self, contour_length=contour, distractor_length=dlen, num_distractors=ndis, seed_distance=float(sd)
        )


@dataclasses.dataclass(frozen=True)
class Scene:
    """The geometry of one image, kept so tests can check connectivity independently.

    snakes:  polylines, each ``[pieces + 1, 2]`` float (y, x) pixel coordinates; 0 and 1
             are the target snakes, the rest distractors.
    markers: ``[2, 2]`` centres of the two markers.
    marker_snakes: which snake each marker's end belongs to.
    label:   1 if both markers are on the same snake.
    """

    snakes: tuple[np.ndarray, ...]
    markers: np.ndarray
    marker_snakes: tuple[int, int]
    label: int

    def paddles(self, gap: float) -> np.ndarray:
        """``[P, 2, 2]`` drawn paddles (start, end): each piece minus its leading gap."""
        out = []
        for line in self.snakes:
            for k in range(len(line) - 1):
                p, q = line[k], line[k + 1]
                if k > 0:
                    u = (q - p) / np.linalg.norm(q - p)
                    p = p + gap * u
                out.append((p, q))
        return np.asarray(out, dtype=np.float64)


# ----------------------------------------------------------------------------- geometry


def point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points ``p`` to segments ``a -> b`` (all ``[..., 2]``, broadcast)."""
    aby, abx = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    apy, apx = p[..., 0] - a[..., 0], p[..., 1] - a[..., 1]
    t = np.minimum(np.maximum((apy * aby + apx * abx) / np.maximum(aby * aby + abx * abx, 1e-12), 0.0), 1.0)
    dy, dx = apy - t * aby, apx - t * abx
    return np.sqrt(dy * dy + dx * dx)


def segment_distance(p1: np.ndarray, q1: np.ndarray, p2: np.ndarray, q2: np.ndarray) -> np.ndarray:
    """Distance between segments ``p1 -> q1`` and ``p2 -> q2`` (``[..., 2]``, broadcast):
    0 if they cross, else the least of the four endpoint-to-segment distances."""

    def cross(u, v):
        return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]

    ends1, ends2 = np.stack(np.broadcast_arrays(p1, q1)), np.stack(np.broadcast_arrays(p2, q2))
    d = np.minimum(point_segment_distance(ends1, p2, q2).min(0), point_segment_distance(ends2, p1, q1).min(0))
    r1, r2 = q1 - p1, q2 - p2
    o1, o2 = cross(r1, p2 - p1), cross(r1, q2 - p1)
    o3, o4 = cross(r2, p1 - p2), cross(r2, q1 - p2)
    crossing = (o1 * o2 < 0) & (o3 * o4 < 0)
    return np.where(crossing, 0.0, d)


class _Canvas:
    """Pieces placed so far, their owners, the target ends; answers clearance queries."""

    def __init__(self, cfg: PathfinderConfig, side: int, capacity: int):
        self.lo = cfg.padding + 0.5
        self.hi = side - cfg.padding - 0.5
        self.clear = cfg.paddle_thickness + 2 * cfg.paddle_margin
        self.tip_clear = cfg.marker_radius + cfg.paddle_thickness / 2 + cfg.paddle_margin
        self.tip_tip = 2 * cfg.marker_radius + cfg.paddle_margin
        self.a = np.zeros((capacity, 2))
        self.b = np.zeros((capacity, 2))
        self.owner = np.full(capacity, -1)
        self.n = 0
        self.tips = np.zeros((0, 2))  # target ends that may carry a marker
        self.tip_owner = np.zeros((0,), dtype=int)

    def inside(self, pts: np.ndarray) -> np.ndarray:
        return ((pts >= self.lo) & (pts <= self.hi)).all(-1)

    def ok(self, p: np.ndarray, q: np.ndarray, owner: int, skip: int, new_tip: bool) -> np.ndarray:
        """Which candidate pieces ``p[c] -> q[c]`` (``[C, 2]``) keep every clearance.

        ``skip``: index of the owner's previous piece (exempt), or -1. ``new_tip``: ``q`` is a
        target end that will carry a marker."""
        good = self.inside(p) & self.inside(q)
        n = self.n
        if n:
            # only pieces near the candidates can violate a clearance: all candidates lie
            # within `reach` of p[0] (they share the start point or are single seeds)
            a, b, own = self.a[:n], self.b[:n], self.owner[:n]
            reach = np.sqrt(((q - p) ** 2).sum(-1)).max() + max(self.clear, self.tip_clear)
            near = point_segment_distance(p[0], a, b) < reach + np.sqrt(((p - p[0]) ** 2).sum(-1)).max()
            if skip >= 0:
                near[skip] = False
            if near.any():
                a, b, own = a[near], b[near], own[near]
                d = segment_distance(p[:, None], q[:, None], a[None], b[None])
                good &= (d >= self.clear).all(1)
                other = own != owner
                if new_tip and other.any():
                    dt = point_segment_distance(q[:, None], a[None, other], b[None, other])
                    good &= (dt >= self.tip_clear).all(1)
        if len(self.tips):
            foreign = self.tips[self.tip_owner != owner]
            if len(foreign):
                good &= (point_segment_distance(foreign[None], p[:, None], q[:, None]) >= self.tip_clear).all(1)
            if new_tip:
                good &= (np.hypot(*(q[:, None] - self.tips[None]).transpose(2, 0, 1)) >= self.tip_tip).all(1)
        return good

    def add_tip(self, point: np.ndarray, owner: int) -> None:
        self.tips = np.concatenate([self.tips, point[None]])
        self.tip_owner = np.append(self.tip_owner, owner)

    def add(self, p: np.ndarray, q: np.ndarray, owner: int) -> int:
        self.a[self.n], self.b[self.n], self.owner[self.n] = p, q, owner
        self.n += 1
        return self.n - 1

    def truncate(self, n: int) -> None:
        self.n = n


class _Snake:
    def __init__(self, owner: int):
        self.owner = owner
        self.points: list[np.ndarray] = []
        self.theta = 0.0
        self.last = -1  # canvas index of the last piece


def _unit(theta) -> np.ndarray:
    return np.stack([np.sin(theta), np.cos(theta)], axis=-1)


def _seed(canvas, cfg, gen, snake, *, around=None, tips=False, tries=64) -> bool:
    """Place the first paddle of ``snake`` at a random free place (or ``seed_distance`` from
    ``around``): ``tries`` random draws tested at once, the first admissible one kept (the
    same law as drawing one at a time until one fits). ``tips``: its start is a target end."""
    if around is not None:
        a0 = around + cfg.seed_distance * _unit(gen.uniform(0, 2 * np.pi, size=tries))
    else:
        a0 = gen.uniform(canvas.lo, canvas.hi, size=(tries, 2))
    theta = gen.uniform(0, 2 * np.pi, size=tries)
    b0 = a0 + cfg.paddle_length * _unit(theta)
    # the start a0 is the end that may carry a marker: pass it as the candidate's "new tip"
    good = np.flatnonzero(canvas.ok(b0, a0, snake.owner, -1, new_tip=tips))
    if good.size == 0:
        return False
    i = good[0]
    snake.points = [a0[i], b0[i]]
    snake.theta = float(theta[i])
    snake.last = canvas.add(a0[i], b0[i], snake.owner)
    if tips:
        canvas.add_tip(a0[i], snake.owner)
    return True


def _extend(canvas, cfg, gen, snake, turns, weights, *, tip=False) -> bool:
    """Add one piece to ``snake`` with a continuity-weighted turn among the admissible ones."""
    step = cfg.paddle_margin + cfg.paddle_length
    thetas = snake.theta + turns
    p = np.broadcast_to(snake.points[-1], (len(turns), 2))
    q = p + step * _unit(thetas)
    good = canvas.ok(p, q, snake.owner, snake.last, new_tip=tip)
    w = weights * good
    total = w.sum()
    if total <= 0:
        return False
    j = int(np.searchsorted(np.cumsum(w), gen.uniform(0, total), side="right"))
    j = min(j, len(turns) - 1)
    snake.points.append(q[j].copy())
    snake.theta = float(thetas[j])
    snake.last = canvas.add(p[j].copy(), q[j].copy(), snake.owner)
    if tip:
        canvas.add_tip(q[j].copy(), snake.owner)
    return True


def sample_scene(gen: np.random.Generator, cfg: PathfinderConfig, side: int, label: int) -> Scene:
    """One scene with the given label (``cfg`` resolved); redraws until complete."""
    turns = np.linspace(-np.pi / 2, np.pi / 2, cfg.num_turns)
    weights = np.cos(np.minimum(np.abs(turns) * cfg.continuity, np.pi / 2)) ** 2
    K, D, M = cfg.contour_length, cfg.num_distractors, cfg.distractor_length
    for _ in range(cfg.max_scene_attempts):
        canvas = _Canvas(cfg, side, 2 * K + D * M)
        targets = [_Snake(0), _Snake(1)]
        if not _seed(canvas, cfg, gen, targets[0], tips=True):
            continue
        if not _seed(canvas, cfg, gen, targets[1], around=targets[0].points[0], tips=True):
            continue
        grown = True
        for k in range(1, K):
            for s in targets:
                if not _extend(canvas, cfg, gen, s, turns, weights, tip=(k == K - 1)):
                    grown = False
                    break
            if not grown:
                break
        if not grown:
            continue
        distractors = []
        for i in range(D):
            for _attempt in range(8):
                snake, mark = _Snake(2 + i), canvas.n
                placed = _seed(canvas, cfg, gen, snake) and all(
                    _extend(canvas, cfg, gen, snake, turns, weights) for _ in range(M - 1)
                )
                if placed:
                    distractors.append(snake)
                    break
                canvas.truncate(mark)
            else:
                break
        if len(distractors) < D:
            continue
        origin = int(gen.integers(0, 2))
        far = origin if label == 1 else 1 - origin
        snakes = tuple(np.asarray(s.points) for s in targets + distractors)
        markers = np.stack([snakes[origin][0], snakes[far][-1]])
        return Scene(snakes=snakes, markers=markers, marker_snakes=(origin, far), label=int(label))
    raise RuntimeError(
        f"pathfinder: no complete scene after {cfg.max_scene_attempts} attempts at side {side} "
        f"(contour_length={K}, {D} distractors of {M}); the image is too crowded: lower "
        "contour_length / num_distractors or raise the side"
    )


# ----------------------------------------------------------------------------- rendering


def _coverage(dist: np.ndarray, radius: float, s: int) -> np.ndarray:
    """Fraction of a 1/s-wide sub-sample covered by a shape of half-width ``radius`` at ``dist``."""
    return np.clip((radius + 0.5 / s - dist) * s, 0.0, 1.0)


def render(scene: Scene, cfg: PathfinderConfig, side: int) -> np.ndarray:
    """Float image ``[side, side]`` in [0, 1] (max 1) of a scene: paddles, then markers."""
    s = cfg.antialias
    n = side * s
    centres = (np.arange(n) + 0.5) / s  # sub-sample centres, in pixels
    dist = np.full((n, n), np.inf)  # distance to the nearest paddle centre line
    reach = cfg.paddle_thickness / 2 + 1.0 / s
    for p, q in scene.paddles(cfg.paddle_margin):
        lo = np.floor((np.minimum(p, q) - reach) * s).astype(int).clip(0, n)
        hi = np.ceil((np.maximum(p, q) + reach) * s).astype(int).clip(0, n)
        yy, xx = np.meshgrid(centres[lo[0] : hi[0]], centres[lo[1] : hi[1]], indexing="ij")
        d = point_segment_distance(np.stack([yy, xx], -1), p, q)
        np.minimum(dist[lo[0] : hi[0], lo[1] : hi[1]], d, out=dist[lo[0] : hi[0], lo[1] : hi[1]])
    ink = _coverage(dist, cfg.paddle_thickness / 2, s) * cfg.paddle_contrast
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    dm = np.min([np.hypot(yy - m[0], xx - m[1]) for m in scene.markers], axis=0)
    img = np.maximum(ink, _coverage(dm, cfg.marker_radius, s)).reshape(side, s, side, s).mean(axis=(1, 3))
    return img / img.max()


def quantize(img: np.ndarray, levels: int) -> np.ndarray:
    """[0, 1] floats -> int32 tokens in [0, levels)."""
    return np.clip(np.rint(img * (levels - 1)), 0, levels - 1).astype(np.int32)


def _scene_rngs(seed: int, n: int) -> list[np.random.Generator]:
    """One generator per image, spawned from ``seed`` (image i's draw does not depend on n)."""
    root = np.random.SeedSequence([int(seed), zlib.crc32(NAME.encode())])
    return [np.random.default_rng(s) for s in root.spawn(n)]


def balanced_labels(gen: np.random.Generator, n: int) -> np.ndarray:
    """``n`` labels, floor(n/2) ones and the rest zeros, in random order."""
    return gen.permutation(np.arange(n) % 2 == 1).astype(np.int32)


def side_of(seq_len: int) -> int:
    side = math.isqrt(seq_len)
    check_config(
        NAME,
        side * side == seq_len,
        f"seq_len must be a square (the image is side x side), got {seq_len}; e.g. 1024 = 32x32, 256 = 16x16",
    )
    return side


def _labels(seed: int, num_train: int, num_val: int, num_test: int) -> np.ndarray:
    label_rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(b"pathfinder/labels")]))
    return np.concatenate([balanced_labels(label_rng, m) for m in (num_train, num_val, num_test)])


def generate_scenes(
    cfg: PathfinderConfig, *, seq_len: int, num_train: int, num_val: int, num_test: int, seed: int
) -> tuple[PathfinderConfig, list[Scene], np.ndarray]:
    """The scenes (geometry) and their labels, in split order train, val, test."""
    side = side_of(seq_len)
    cfg = cfg.resolve(side)
    labels = _labels(seed, num_train, num_val, num_test)
    scenes = [sample_scene(g, cfg, side, int(lab)) for g, lab in zip(_scene_rngs(seed, len(labels)), labels)]
    return cfg, scenes, labels


def _images(cfg: PathfinderConfig, side: int, seeds: list, labels: np.ndarray) -> np.ndarray:
    """Token rows of the scenes drawn from ``seeds`` (SeedSequences) with ``labels``."""
    return np.stack(
        [
            quantize(render(sample_scene(np.random.default_rng(sd), cfg, side, int(lab)), cfg, side), cfg.levels).ravel()
            for sd, lab in zip(seeds, labels)
        ]
    )


def _workers(n: int) -> int:
    """Worker processes for ``n`` images: ``$EA_TASK_WORKERS`` (default 1), at most n // 64."""
    try:
        wanted = int(os.environ.get("EA_TASK_WORKERS", "1"))
    except ValueError:
        raise ValueError(f"EA_TASK_WORKERS must be an integer, got {os.environ['EA_TASK_WORKERS']!r}") from None
    return max(1, min(wanted, n // 64))


def generate(cfg: PathfinderConfig, *, seq_len: int, num_train: int, num_val: int, num_test: int, seed: int) -> TaskData:
    """Balanced Pathfinder images as ``side*side`` grey-level tokens.

    Every image has its own seed (spawned from ``seed``), so the arrays do not depend on the
    number of worker processes (``$EA_TASK_WORKERS``, default 1: this is CPU-bound numpy)."""
    side = side_of(seq_len)
    cfg = cfg.resolve(side)
    labels = _labels(seed, num_train, num_val, num_test)
    n = len(labels)
    seeds = np.random.SeedSequence([int(seed), zlib.crc32(NAME.encode())]).spawn(n)
    workers = _workers(n)
    if workers == 1:
        inputs = _images(cfg, side, seeds, labels)
    else:
        bounds = np.linspace(0, n, 4 * workers + 1).astype(int)
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold JAX threads
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            parts = pool.map(
                _images,
                *zip(*[(cfg, side, seeds[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]),
            )
            inputs = np.concatenate(list(parts))
    mask = np.ones_like(inputs, dtype=bool)
    train, val, test = three_splits(inputs, labels, mask, num_train, num_val)
    params = dataclasses.asdict(cfg)
    params.update(side=side, paddles_per_image=2 * cfg.contour_length + cfg.num_distractors * cfg.distractor_length)
    return TaskData(
        name=NAME,
        kind="classify",
        causal=False,
        vocab_size=cfg.levels,
        num_classes=2,
        seq_len=seq_len,
        train=train,
        val=val,
        test=test,
        metric="accuracy",
        params=params,
    )


# ----------------------------------------------------------------------------- PNG output


def render_png(image: np.ndarray, path: str | Path, *, levels: int | None = None, scale: int = 1) -> Path:
    """Write a grey-level PNG of ``image`` (``[H, W]``, or a flat square token row).

    Floats are read as [0, 1]; integers as tokens in [0, levels) (levels defaults to
    ``max + 1`` but at least 256). ``scale`` repeats pixels (nearest) for viewing. Pure
    zlib, no imaging library."""
    arr = np.asarray(image)
    if arr.ndim == 1:
        arr = arr.reshape(side_of(arr.size), -1)
    if np.issubdtype(arr.dtype, np.floating):
        grey = np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8)
    else:
        top = (levels if levels is not None else max(256, int(arr.max()) + 1)) - 1
        grey = np.clip(np.rint(arr.astype(np.float64) * 255 / top), 0, 255).astype(np.uint8)
    if scale > 1:
        grey = grey.repeat(scale, 0).repeat(scale, 1)
    h, w = grey.shape
    raw = b"".join(b"\x00" + grey[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def render_grid_png(images, path: str | Path, *, ncols: int = 8, scale: int = 4, levels: int | None = None) -> Path:
    """Several images (flat square token rows or ``[H, W]``) tiled in one PNG, 1-px separators."""
    tiles = [np.asarray(im) for im in images]
    tiles = [t.reshape(side_of(t.size), -1) if t.ndim == 1 else t for t in tiles]
    top = levels if levels is not None else max(256, max(int(t.max()) for t in tiles) + 1)
    tiles = [t / (top - 1) if not np.issubdtype(t.dtype, np.floating) else t for t in tiles]
    h, w = tiles[0].shape
    rows = -(-len(tiles) // ncols)
    sheet = np.full((rows * (h + 1) + 1, ncols * (w + 1) + 1), 0.5)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        sheet[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = t
    return render_png(sheet, path, scale=scale)
