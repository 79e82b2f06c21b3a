"""The approximation experiment: how far each variant is from "full" as its budget grows.

For every registered variant (plugins included) and every value of its budget
hyperparameter (``BUDGETS``: Performer's features, Linformer's rank, Nystromformer's
landmarks, local / Longformer windows, BigBird's random blocks, Reformer's hashes, ...; a
variant not listed gets one row at its default hyperparameters), on the same inputs as
"full", we measure

    relative output error   ||out - out_full|| / ||out_full||     (real queries only)
    row KL                  mean over rows of KL(A_full || A_variant), in nats

where A is the attention matrix a variant *implies*, found generically by probing it with
one-hot values (``efficient_attn.patterns.implied_weights``: out = A V for every variant
linear in V; ``probe_consistency`` checks it). KL is reported only where A is a
distribution (nonnegative rows summing to 1); Linformer and Nystromformer imply signed
weights, for which the mean negative mass per row is reported instead. The KL smooths A
with weight 1e-6 of the uniform distribution: a key that full attends to and a sparse
variant never sees costs about log(1e6) = 13.8 nats per unit of full's weight on it.

Inputs: (a) Gaussian q, k, v, with q scaled so that the logits' standard deviation is
``q_scale`` (0.25: flat attention; 1: moderate; 4: peaked), mean ± std over seeds (each seed
draws new inputs and a new module initialisation); (b) the q, k, v that a small trained
"full" Classifier computes at one layer on ListOps examples (its padding passed as kv_mask),
mean ± std over module seeds. Learned variants (linformer's projections, synthesizer,
sinkhorn) are untrained in both: their rows measure an initialisation, not what training
would reach.

A picture, ``patterns.png``: each variant's implied weights for one structured input at a
small N (``patterns.structured_qk``), bidirectional and causal, beside full's.

Outputs under ``--out`` (default ``results/approximation/<preset>``): ``rows.jsonl`` (the
resumable store: a rerun skips finished rows; ``--force`` recomputes), ``table.md``,
``rows.csv``, ``rows.json`` (with the environment), ``error_vs_budget.png``,
``patterns.png`` (+ ``patterns.npz``, its cached matrices).

Presets: quick (N = 128, 3 scales x 3 seeds, 3 budget values per variant, bidirectional
errors; about a minute on 2 idle cores), cpu (N = 1024, every budget value, causal too),
lra (N = 2048 with ListOps at LRA's length and model size; an accelerator). The trained
model's q, k, v are cached in ``trained_qkv.npz`` beside the rows, so a rerun that adds a
variant does not train again.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_attn import patterns, report
from efficient_attn.core import Mask, check_config, check_positive_int
from efficient_attn.ops.masks import dense_visibility
from efficient_attn.registry import build, get_spec, list_variants, load_plugin

__all__ = ["BUDGETS", "TrainedInput", "ApproxConfig", "PRESETS", "plan_units", "run", "write_outputs", "main"]

# variant -> (budget hyperparameter, values). Values above the sequence length are dropped
# for length-like hyperparameters. A variant not listed gets one row at its defaults.
BUDGETS: dict[str, tuple[str, list[int]]] = {
    "performer": ("num_features", [8, 16, 32, 64, 128, 256, 512]),
    "linformer": ("rank", [8, 16, 32, 64, 128, 256]),
    "nystromformer": ("num_landmarks", [8, 16, 32, 64, 128, 256]),
    "local": ("window", [4, 8, 16, 32, 64, 128, 256]),  # keys on each side
    "longformer": ("window", [8, 16, 32, 64, 128, 256, 512]),  # total width
    "bigbird": ("block_size", [8, 16, 32, 64, 128]),  # 3 window + 2 global + 3 random blocks
    "sparse_transformer": ("block_size", [4, 8, 16, 32, 64]),
    "reformer": ("num_hashes", [1, 2, 4, 8]),
    "sinkhorn": ("block_size", [8, 16, 32, 64, 128]),
}
LENGTH_LIKE = {"rank", "num_landmarks", "window", "block_size"}
# patterns.png is drawn at a small N (64): budgets scaled down so the picture shows the
# pattern rather than an exact copy of full (at their defaults several variants cover N = 64).
PATTERN_SETTINGS: dict[str, dict[str, int]] = {
    "performer": {"num_features": 64},
    "linformer": {"rank": 16},
    "nystromformer": {"num_landmarks": 8},
    "local": {"window": 8},
    "longformer": {"window": 16},
    "bigbird": {"block_size": 8},
    "sparse_transformer": {"block_size": 4},
    "reformer": {"bucket_size": 8},
    "sinkhorn": {"block_size": 8},
}
LEARNED = {"linformer", "synthesizer", "sinkhorn"}  # untrained here: rows measure an initialisation


def _is_shared_qk(variant: str) -> bool:
    """Variants whose keys are their normalised queries (``Capabilities.shared_qk``; the k they
    are given is unused) are compared with full attention on those same keys, self excluded
    unless alone -- the function they approximate -- since against full on an independent k
    their error is ~1 at any budget."""
    return get_spec(variant).capabilities.shared_qk

SCALE_NAMES = {0.25: "flat", 1.0: "moderate", 4.0: "peaked"}


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class TrainedInput:
    """Input (b): a small "full" Classifier trained on a task; q, k, v captured at ``layer``.

    The model has the sweep's heads and head width, and sequences of ``seq_len - 1`` tokens
    (+ CLS = ``seq_len``); ``batch`` test examples (those with the least padding) are used.
    The shapes then equal the Gaussian inputs', so both share one compiled function.
    """

    task: str = "listops"
    num_train: int = 2000
    steps: int = 300
    layer: int = -1
    num_layers: int = 2
    mlp_dim: int = 128
    task_params: tuple = (("max_depth", 6),)

    def __post_init__(self):
        for f in ("num_train", "steps", "num_layers", "mlp_dim"):
            check_positive_int("TrainedInput", f, getattr(self, f))
        check_config("TrainedInput", -self.num_layers <= self.layer < self.num_layers,
                     f"layer must index one of {self.num_layers} layers, got {self.layer}")


@dataclasses.dataclass(frozen=True)
class ApproxConfig:
    """One sweep. ``budget_points``: keep at most this many values per budget (None = all)."""

    preset: str
    seq_len: int = 256
    num_heads: int = 2
    head_dim: int = 32
    batch: int = 2
    q_scales: tuple[float, ...] = (0.25, 1.0, 4.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    causal: tuple[bool, ...] = (False,)
    budget_points: int | None = None
    variants: tuple[str, ...] | None = None
    pattern_len: int = 64
    trained: TrainedInput | None = TrainedInput()
    fast_compile: bool = False  # XLA optimisation level 0: many small probes compile 2-3x faster

    def __post_init__(self):
        for f in ("seq_len", "num_heads", "head_dim", "batch", "pattern_len"):
            check_positive_int("ApproxConfig", f, getattr(self, f))
        check_config("ApproxConfig", len(self.seeds) > 0, "seeds must not be empty")
        check_config("ApproxConfig", len(self.q_scales) > 0 and all(s > 0 for s in self.q_scales),
                     f"q_scales must be positive, got {self.q_scales}")
        if self.budget_points is not None:
            check_positive_int("ApproxConfig", "budget_points", self.budget_points, minimum=2)


PRESETS: dict[str, Callable[[], ApproxConfig]] = {
    # about a minute on 2 idle cores: N = 128, 3 budget points, bidirectional only, and a
    # model trained 150 steps (a third of the time goes to training it)
    "quick": lambda: ApproxConfig(preset="quick", seq_len=128, budget_points=3, fast_compile=True,
                                  trained=TrainedInput(num_train=1000, steps=150)),
    # tens of minutes on 2 cores: N = 1024, every budget value, causal too
    "cpu": lambda: ApproxConfig(preset="cpu", seq_len=1024, causal=(False, True),
                                trained=TrainedInput(num_train=5000, steps=1000)),
    # an accelerator: ListOps at LRA's length (2000 tokens + CLS, padded to 2048) and model
    # (4 layers, 8 heads of 64, MLP 1024), fewer training steps than LRA's 5000
    "lra": lambda: ApproxConfig(preset="lra", seq_len=2048, batch=4, num_heads=8, head_dim=64, causal=(False, True),
                                trained=TrainedInput(num_train=20000, steps=2000, num_layers=4, mlp_dim=1024,
                                                     task_params=())),
}


# ----------------------------------------------------------------------------- planning


def _thin(values: list, k: int | None) -> list:
    if k is None or len(values) <= k:
        return list(values)
    idx = sorted(set(int(round(i)) for i in np.linspace(0, len(values) - 1, k)))
    return [values[i] for i in idx]


def budget_of(variant: str, n: int, budget_points: int | None = None) -> tuple[str | None, list, str]:
    """(hyperparameter, values, note) of ``variant`` at length ``n``; (None, [None], note) = defaults."""
    defaults = get_spec(variant).defaults()
    if variant not in BUDGETS:
        return None, [None], ""
    hp, values = BUDGETS[variant]
    if hp not in defaults:
        return None, [None], f"budget {hp!r} is not a hyperparameter of {variant} ({', '.join(defaults) or 'none'})"
    values = [v for v in values if not (hp in LENGTH_LIKE and v > n)]
    return hp, _thin(values, budget_points), ""


def plan_units(cfg: ApproxConfig, variants: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """Every (input, variant, value, causal) to measure, and the skipped ones with reasons."""
    units, skipped = [], []
    inputs = [("gauss", s) for s in cfg.q_scales]
    if cfg.trained is not None:
        inputs.append(("trained", None))
    for variant in variants:
        caps = get_spec(variant).capabilities
        for input_kind, scale in inputs:
            hp, values, note = budget_of(variant, cfg.seq_len, cfg.budget_points)
            modes = cfg.causal if input_kind == "gauss" else (False,)
            for causal in modes:
                if causal and not caps.causal:
                    skipped.append({"variant": variant, "input": input_kind, "causal": True,
                                    "reason": "no causal mode (capabilities.causal=False)"})
                    continue
                if input_kind == "trained" and not caps.kv_mask:
                    skipped.append({"variant": variant, "input": "trained", "causal": False,
                                    "reason": "the trained model's inputs are padded; variant has no kv_mask"})
                    continue
                for value in values:
                    units.append({"variant": variant, "input": input_kind, "q_scale": scale, "causal": causal,
                                  "hyperparameter": hp, "value": value, "budget_note": note})
    return units, skipped


def _unit_key(cfg: ApproxConfig, u: dict) -> str:
    where = f"{cfg.seq_len}x{cfg.batch}h{cfg.num_heads}d{cfg.head_dim}"
    if u["input"] == "trained":
        t = cfg.trained
        where += f"-trained-{t.task}-l{t.layer}of{t.num_layers}-s{t.steps}-n{t.num_train}-m{t.mlp_dim}"
    return report.RowStore.make_key(where, u["variant"], u["hyperparameter"], u["value"], u["causal"],
                                    u["q_scale"], ",".join(map(str, cfg.seeds)))


# ----------------------------------------------------------------------------- measuring

PROBE_SCORES = 2**27  # at most this many (batch x head x query x key) entries per call (512 MiB in f32)


def _probe(module, q, k, v, mask, fast_compile: bool = False):
    """(implied weights [B, H, T, S], output on v [B, T, H, D]) from the probing batch.

    The batch goes through in groups of equal size (the last one padded), each small enough
    that a quadratic variant's scores stay under ``PROBE_SCORES`` entries. The module's state
    is passed unchanged to every group, so randomness drawn per call (Performer's redraw) is
    the same in all of them.
    """
    qq, kk, vv, mm, C = patterns.probe_batch(q, k, mask, extra_v=v)
    total = qq.shape[0]
    group = max(1, min(total, PROBE_SCORES // (q.shape[2] * q.shape[1] * k.shape[1])))
    n_groups = -(-total // group)
    pad = n_groups * group - total

    def rows(x, start):
        if x is None or x.shape[0] != total:  # None, or a dense mask broadcast over the batch
            return x
        x = jnp.concatenate([x, x[:pad]]) if pad else x
        return x[start : start + group]

    outs = []
    for g in range(n_groups):
        s = g * group
        m = None if mm is None else Mask(causal=mm.causal, kv_mask=rows(mm.kv_mask, s), q_mask=rows(mm.q_mask, s),
                                         dense=rows(mm.dense, s))
        outs.append(patterns.call(module, rows(qq, s), rows(kk, s), rows(vv, s), m, fast_compile=fast_compile))
    out = jnp.concatenate(outs)[:total]
    a, o = patterns.split_probe(out, q.shape[0], k.shape[1], C, has_extra=True)
    return np.asarray(a), np.asarray(o, np.float32)


def _gaussian(cfg: ApproxConfig, seed: int, scale: float):
    kq, kk, kv = jax.random.split(jax.random.key(1000 + seed), 3)
    shape = (cfg.batch, cfg.seq_len, cfg.num_heads, cfg.head_dim)
    q = jax.random.normal(kq, shape) * scale
    return q, jax.random.normal(kk, shape), jax.random.normal(kv, shape)


def _capture_trained(cfg: ApproxConfig, log=print) -> dict:
    """Train a small full Classifier on ``t.task`` and capture (q, k, v, mask) at ``t.layer``."""
    from efficient_attn import tasks
    from efficient_attn.nn import Classifier, EncoderConfig
    from efficient_attn.train import TrainConfig, train

    t = cfg.trained
    t0 = time.perf_counter()
    data = tasks.load(t.task, seq_len=cfg.seq_len - 1, num_train=t.num_train, num_val=200, num_test=200, seed=0,
                      **dict(t.task_params))
    enc = EncoderConfig(vocab_size=data.vocab_size, max_len=data.seq_len, num_classes=data.num_classes,
                        num_layers=t.num_layers, emb_dim=cfg.num_heads * cfg.head_dim, num_heads=cfg.num_heads,
                        mlp_dim=t.mlp_dim, pool="cls", attention="full")
    model = Classifier(enc, rngs=nnx.Rngs(0))
    tc = TrainConfig(lr=2e-3, weight_decay=0.01, warmup=min(50, t.steps // 5), steps=t.steps, batch_size=32,
                     eval_every=max(t.steps // 2, 1), eval_batch_size=100)
    result = train(model, data, tc, progress=False)
    model = result.model
    block = model.trunk.blocks[t.layer]
    original, fast = block.attn.core, block.attn.fast_core
    seen: dict = {}

    class _Recorder:  # sits in place of the core for one forward pass, then is removed
        def __call__(self, q, k, v, *, mask=None):
            seen.update(q=q, k=k, v=v, mask=mask)
            return original(q, k, v, mask=mask)

    # the test examples with the most real tokens (least padding)
    inputs, masks = np.asarray(data.test.inputs), np.asarray(data.test.mask)
    pick = np.argsort(-masks.sum(1), kind="stable")[: cfg.batch]
    try:
        block.attn.core, block.attn.fast_core = _Recorder(), None  # the fast exact path off: record here
        model(jnp.asarray(inputs[pick]), jnp.asarray(masks[pick]))
    finally:
        block.attn.core, block.attn.fast_core = original, fast
    log(f"  trained full Classifier on {t.task} (N={data.seq_len}, {t.steps} steps): test accuracy "
        f"{result.test:.3f} in {time.perf_counter() - t0:.0f} s")
    return {"q": seen["q"], "k": seen["k"], "v": seen["v"], "mask": seen["mask"],
            "test_accuracy": float(result.test), "majority": float(np.bincount(np.asarray(data.test.targets)).max()
                                                                    / len(data.test))}


def _trained_inputs(cfg: ApproxConfig, path: Path, force: bool, log) -> dict:
    """``_capture_trained``'s arrays, cached in ``path`` (an npz keyed by the trained setting)."""
    ident = _unit_key(cfg, {"input": "trained", "variant": "", "hyperparameter": None, "value": None,
                            "causal": False, "q_scale": None})
    if path.exists() and not force:
        with np.load(path) as z:
            if str(z["ident"]) == ident:
                return {"q": jnp.asarray(z["q"]), "k": jnp.asarray(z["k"]), "v": jnp.asarray(z["v"]),
                        "mask": Mask(kv_mask=jnp.asarray(z["kv_mask"])), "test_accuracy": float(z["test_accuracy"]),
                        "majority": float(z["majority"])}
    got = _capture_trained(cfg, log)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, ident=ident, q=np.asarray(got["q"]), k=np.asarray(got["k"]), v=np.asarray(got["v"]),
                        kv_mask=np.asarray(got["mask"].kv_mask), test_accuracy=got["test_accuracy"],
                        majority=got["majority"])
    tmp.replace(path)
    return got


def _metrics(a, o, a_full, o_full, v, q_valid) -> dict:
    """Errors of one (variant, input): rows restricted to real queries (q_valid [B, T])."""
    qv = np.asarray(q_valid, bool)
    rows = qv[:, None, :]  # [B, 1, T]
    diff = (o - o_full)[qv]
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(o_full[qv]), 1e-30))
    a_ref = np.where(rows[..., None], a_full, 0.0)  # invisible rows drop out of KL and masses
    a_m = np.where(rows[..., None], a, 0.0)
    dist = patterns.is_distribution(a_m, a_ref)
    return {
        "rel_err": rel,
        "kl": patterns.row_kl(a_ref, a_m) if dist else None,
        "distribution": dist,
        "neg_mass": patterns.negative_mass(a_m, a_ref),
        "consistency": patterns.probe_consistency(jnp.asarray(a), v, o),
    }


def _mean_std(xs: list) -> tuple[float | None, float | None]:
    vals = [x for x in xs if x is not None]
    if not vals or len(vals) != len(xs):
        return None, None
    return float(np.mean(vals)), float(np.std(vals))


def _shared_qk(q, mask: Mask | None):
    """Keys k_j = q_j / ||q_j|| and the mask for full attention that excludes self unless alone."""
    k = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-6)
    B, T = q.shape[:2]
    m = mask or Mask()
    vis = dense_visibility(Mask(causal=m.causal, kv_mask=m.kv_mask), B, T, T)
    vis = jnp.ones((B, 1, T, T), bool) if vis is None else vis
    not_self = ~jnp.eye(T, dtype=bool)[None, None]
    alone = ~jnp.any(vis & not_self, axis=-1, keepdims=True)
    return k, Mask(causal=m.causal, kv_mask=m.kv_mask, q_mask=m.q_mask, dense=not_self | alone)


def _measure_unit(cfg: ApproxConfig, u: dict, full_cache: dict, trained: dict | None) -> dict:
    per_seed = []
    for seed in cfg.seeds:
        n, H, D = cfg.seq_len, cfg.num_heads, cfg.head_dim
        if u["input"] == "gauss":
            q, k, v = _gaussian(cfg, seed, u["q_scale"])
            # an all-True key mask where the variant takes one: the same pytree as the trained
            # input's, so both inputs run one compiled function (the values are unchanged)
            everything = jnp.ones(q.shape[:2], bool) if get_spec(u["variant"]).capabilities.kv_mask else None
            mask = Mask(causal=u["causal"], kv_mask=everything)
            q_valid = np.ones(q.shape[:2], bool)
            ref_key = ("gauss", seed, u["q_scale"], u["causal"], everything is None)
        else:
            q, k, v, mask = trained["q"], trained["k"], trained["v"], trained["mask"]
            q_valid = np.asarray(mask.kv_mask)
            ref_key = ("trained",)
        full_mask = mask
        if _is_shared_qk(u["variant"]):
            k, full_mask = _shared_qk(q, mask)
            ref_key += ("shared-qk",)
        if ref_key not in full_cache:
            full_cache[ref_key] = _probe(build("full", num_heads=H, head_dim=D, max_len=n), q, k, v, full_mask,
                                         cfg.fast_compile)
        a_full, o_full = full_cache[ref_key]
        hp = {u["hyperparameter"]: u["value"]} if u["hyperparameter"] else {}
        module = build(u["variant"], num_heads=H, head_dim=D, max_len=n, rngs=nnx.Rngs(seed), **hp)
        a, o = _probe(module, q, k, v, mask, cfg.fast_compile)
        per_seed.append(_metrics(a, o, a_full, o_full, v, q_valid))
    row = {k: u[k] for k in ("input", "variant", "hyperparameter", "value", "causal", "q_scale")}
    row["seq_len"] = int(q.shape[1])
    for m in ("rel_err", "kl", "neg_mass"):
        row[m], row[m + "_std"] = _mean_std([s[m] for s in per_seed])
    row["distribution"] = all(s["distribution"] for s in per_seed)
    row["consistency"] = max(s["consistency"] for s in per_seed)
    row["seeds"] = len(per_seed)
    row["status"] = "ok"
    return row


def _pattern_setting(variant: str) -> dict:
    defaults = get_spec(variant).defaults()
    return {k: v for k, v in PATTERN_SETTINGS.get(variant, {}).items() if k in defaults}


def _pattern_panels(cfg: ApproxConfig, variants: Sequence[str], cache_path: Path, force: bool, log) -> dict:
    """{variant: {mode: [T, S] matrix or reason}} at ``cfg.pattern_len``, cached in an npz."""
    n = cfg.pattern_len
    cached: dict[str, np.ndarray] = {}
    if cache_path.exists() and not force:
        with np.load(cache_path) as z:
            cached = {k: z[k] for k in z.files}
    q, k = patterns.structured_qk(n, cfg.num_heads, cfg.head_dim)
    v = jnp.zeros_like(q)
    panels: dict[str, dict] = {}
    for variant in ["full"] + [x for x in variants if x != "full"]:
        caps = get_spec(variant).capabilities
        panels[variant] = {}
        for mode in ("bidirectional", "causal"):
            setting = ",".join(f"{a}={b}" for a, b in _pattern_setting(variant).items())
            key = f"{variant}|{setting}|{mode}|{n}"
            if mode == "causal" and not caps.causal:
                panels[variant][mode] = "no causal mode"
                continue
            if key not in cached:
                try:
                    module = build(variant, num_heads=cfg.num_heads, head_dim=cfg.head_dim, max_len=n,
                                   **_pattern_setting(variant))
                    a, _ = _probe(module, q, k, v, Mask(causal=mode == "causal"), cfg.fast_compile)
                    cached[key] = a[0, 0]
                except Exception as err:  # noqa: BLE001  (a picture must not stop the sweep)
                    log(f"  patterns: {variant} {mode} failed: {type(err).__name__}: {err}")
                    panels[variant][mode] = f"error: {type(err).__name__}"
                    continue
            panels[variant][mode] = cached[key]
        label = ",".join(f"{a}={b}" for a, b in _pattern_setting(variant).items())
        if _is_shared_qk(variant):
            label = ", ".join(x for x in (label, "shared QK") if x)
        if label:
            panels[variant]["label"] = label
    tmp = cache_path.with_name(f".{cache_path.stem}.tmp.npz")
    np.savez_compressed(tmp, **cached)
    tmp.replace(cache_path)
    return panels


def run(cfg: ApproxConfig, out: str | Path, *, force: bool = False, progress: bool = True, log=print) -> list[dict]:
    """Measure every pending unit of ``cfg``, draw the patterns, write the outputs; return the rows.
    ``progress=False`` drops the running row count (errors and the summary lines stay)."""
    out = Path(out)
    store = report.RowStore(out / "rows.jsonl", force=force)
    variants = list(cfg.variants) if cfg.variants is not None else list_variants()
    for name in variants:
        get_spec(name)  # unknown names fail now, with suggestions
    units, skipped = plan_units(cfg, variants)
    pending = [u for u in units if not (store.has(_unit_key(cfg, u)) and store.get(_unit_key(cfg, u))["status"] == "ok")]
    log(f"approximation ({cfg.preset}): {len(units)} rows, {len(units) - len(pending)} already done")
    full_cache: dict = {}
    trained = None
    extra = {}
    t0 = time.perf_counter()
    for i, u in enumerate(pending):
        key = _unit_key(cfg, u)
        if u["input"] == "trained" and trained is None:
            trained = _trained_inputs(cfg, out / "trained_qkv.npz", force, log)
        try:
            row = _measure_unit(cfg, u, full_cache, trained)
        except Exception as err:  # noqa: BLE001  (one failing unit must not stop the sweep)
            row = {k: u[k] for k in ("input", "variant", "hyperparameter", "value", "causal", "q_scale")}
            row.update(status="error", error=f"{type(err).__name__}: {err}")
            log(f"  error: {u['variant']} {u['hyperparameter']}={u['value']}: {row['error']}")
            log("".join(traceback.format_exception_only(type(err), err)).strip())
        row["budget_note"] = u["budget_note"]
        store.add(key, row)
        if progress and ((i + 1) % 10 == 0 or i + 1 == len(pending)):
            log(f"  {i + 1}/{len(pending)} rows ({time.perf_counter() - t0:.0f} s)")
    rows = [store.get(_unit_key(cfg, u)) for u in units]
    if cfg.trained is not None and (out / "trained_qkv.npz").exists():
        with np.load(out / "trained_qkv.npz") as z:
            extra = {"test_accuracy": float(z["test_accuracy"]), "majority": float(z["majority"])}
    t1 = time.perf_counter()
    panels = _pattern_panels(cfg, variants, out / "patterns.npz", force, log)
    log(f"  patterns.png: {len(panels)} variants ({time.perf_counter() - t1:.0f} s)")
    write_outputs(cfg, rows, skipped, panels, out, extra)
    return rows


# ----------------------------------------------------------------------------- writing


def _pm(mean, std, digits=3) -> str:
    if mean is None:
        return "-"
    fmt = lambda x: f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"  # noqa: E731
    return fmt(mean) + (f" ± {fmt(std)}" if std else "")


def _setting(row: dict) -> str:
    if not row.get("hyperparameter"):
        return "defaults"
    return f"{row['hyperparameter']}={row['value']}"


def markdown(cfg: ApproxConfig, rows: list[dict], skipped: list[dict], extra: dict) -> str:
    ok = [r for r in rows if r and r.get("status") == "ok"]
    lines = [f"# Approximation error against full attention ({cfg.preset})\n"]
    lines.append(
        f"Relative output error ||out - full|| / ||full|| and mean row KL(full || variant) (nats) of the "
        f"attention weights each variant implies (found by probing with one-hot values), as each variant's "
        f"budget grows. Gaussian inputs: N = {cfg.seq_len}, batch {cfg.batch}, {cfg.num_heads} heads of "
        f"{cfg.head_dim}; q scaled so the logits' std is the q scale; mean ± std over {len(cfg.seeds)} seeds "
        f"(new inputs and a new module initialisation each).\n")
    scales = list(cfg.q_scales)
    for causal in cfg.causal:
        sub = [r for r in ok if r["input"] == "gauss" and r["causal"] == causal]
        if not sub:
            continue
        lines.append(f"\n## Gaussian inputs, {'causal' if causal else 'bidirectional'}\n")
        headers = ["variant", "setting"] + [f"err (q scale {s})" for s in scales] + [f"KL (q scale {s})" for s in scales]
        table = []
        seen = []
        for r in sub:
            ident = (r["variant"], _setting(r))
            if ident not in seen:
                seen.append(ident)
        for variant, setting in seen:
            cells = {r["q_scale"]: r for r in sub if (r["variant"], _setting(r)) == (variant, setting)}
            errs = [_pm(cells[s]["rel_err"], cells[s]["rel_err_std"]) if s in cells else "-" for s in scales]
            kls = [_pm(cells[s]["kl"], cells[s]["kl_std"]) if s in cells else "-" for s in scales]
            table.append([variant, setting] + errs + kls)
        lines.append(report.markdown_table(headers, table))
    tr = [r for r in ok if r["input"] == "trained"]
    if tr and cfg.trained is not None:
        t = cfg.trained
        acc = extra.get("test_accuracy")
        lines.append(f"\n## q, k, v of a trained full model ({t.task}, layer {t.layer}, {cfg.batch} examples)\n")
        lines.append(
            f"A {t.num_layers}-layer, width-{cfg.num_heads * cfg.head_dim}, {cfg.num_heads}-head full-attention "
            f"Classifier trained {t.steps} steps on {t.task} at length {cfg.seq_len - 1} (+ CLS)"
            + (f"; test accuracy {acc:.3f} (majority class {extra.get('majority', float('nan')):.3f})" if acc is not None else "")
            + ". Padding is passed as kv_mask; errors count real queries only. mean ± std over module seeds.\n")
        headers = ["variant", "setting", "rel. error", "KL", "neg. mass / row"]
        lines.append(report.markdown_table(headers, [
            [r["variant"], _setting(r), _pm(r["rel_err"], r["rel_err_std"]), _pm(r["kl"], r["kl_std"]),
             _pm(r["neg_mass"], None)] for r in tr]))
    lines.append("\n## Notes\n")
    present = sorted({r["variant"] for r in ok})
    learned = [v for v in present if v in LEARNED]
    if learned:
        lines.append(f"- Untrained learned variants: {', '.join(learned)} are measured at initialisation (random "
                     "projections, logits, sorting networks); their errors say nothing about a trained model.")
    signed = sorted({r["variant"] for r in ok if not r["distribution"]})
    if signed:
        masses = {v: max((r["neg_mass"] or 0.0) for r in ok if r["variant"] == v) for v in signed}
        lines.append("- Not a distribution (signed or unnormalised implied weights, so no KL): "
                     + ", ".join(f"{v} (negative mass per row up to {masses[v]:.2g})" for v in signed) + ".")
    bad = sorted({r["variant"] for r in ok if r["consistency"] is not None and r["consistency"] > 1e-3})
    lines.append("- Probe check (||A V - out|| / ||out||, A from one-hot probing): "
                 + (f"above 1e-3 for {', '.join(bad)}: their implied weights do not reproduce their output "
                    "(not linear in V, or randomness that differs across the batch)." if bad
                    else "below 1e-3 for every row: each variant's output is A V with the A drawn in patterns.png."))
    shared = [v for v in present if _is_shared_qk(v)]
    if shared:
        lines.append(f"- Shared-QK variants ({', '.join(shared)}) ignore k (their keys are the normalised queries): "
                     "they are compared with full attention on those keys, self excluded unless alone, the function "
                     "they approximate. In patterns.png they are drawn on the pictures' q (their keys being those q), "
                     "beside full on independent k.")
    lines.append("- Relative error: with flat attention (small q scale) full's output is close to the mean of V, "
                 "whose norm is small, so relative errors are large; an error above 1 means the output is farther "
                 "from full's than zero is. Values of ~1e-7 are exact up to rounding (the budget covers every key).")
    lines.append("- KL smoothing: the variant's weights are mixed with 1e-6 of the uniform distribution over visible "
                 "keys, so a key full attends to and the variant never sees costs about 13.8 nats per unit of weight.")
    for s in skipped:
        lines.append(f"- Skipped: {s['variant']} on {s['input']} inputs{' (causal)' if s['causal'] else ''}: {s['reason']}.")
    notes = sorted({(r["variant"], r.get("budget_note")) for r in rows if r and r.get("budget_note")})
    for variant, note in notes:
        lines.append(f"- {variant}: {note}; measured at its defaults only.")
    for r in rows:
        if r and r.get("status") == "error":
            lines.append(f"- Error: {r['variant']} {_setting(r)} ({r['input']}): {r['error']}")
    return "\n".join(lines) + "\n"


def _plot_budgets(cfg: ApproxConfig, rows: list[dict], path: Path, per_row: int = 5) -> None:
    """A grid with two panels per budgeted variant (relative error over KL), one line per
    input; values below 1e-7 (exact up to rounding) are drawn at 1e-7."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter

    ok = [r for r in rows if r and r.get("status") == "ok" and r.get("hyperparameter")]
    variants = sorted({r["variant"] for r in ok})
    cols = max(min(len(variants), per_row), 1)
    grid_rows = max(-(-len(variants) // cols), 1)
    fig, axes = plt.subplots(2 * grid_rows, cols, figsize=(3.3 * cols, 2.6 * 2 * grid_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = [(f"q scale {s}", lambda r, s=s: r["input"] == "gauss" and r["q_scale"] == s and not r["causal"],
               colors[i % len(colors)], "-") for i, s in enumerate(cfg.q_scales)]
    series += [(f"q scale {s}, causal", lambda r, s=s: r["input"] == "gauss" and r["q_scale"] == s and r["causal"],
                colors[i % len(colors)], ":") for i, s in enumerate(cfg.q_scales)]
    series.append(("trained model", lambda r: r["input"] == "trained", "black", "--"))
    for j, variant in enumerate(variants):
        sub = [r for r in ok if r["variant"] == variant]
        values = sorted({r["value"] for r in sub})
        x_of = {v: i for i, v in enumerate(values)}
        g, c = divmod(j, cols)
        for metric, ax in (("rel_err", axes[2 * g, c]), ("kl", axes[2 * g + 1, c])):
            ax.axis("on")
            for label, pick, color, style in series:
                pts = sorted((x_of[r["value"]], max(r[metric], 1e-7), r.get(metric + "_std") or 0.0) for r in sub
                             if pick(r) and r[metric] is not None)
                if pts:
                    xs, ys, es = zip(*pts)
                    ax.errorbar(xs, ys, yerr=es, color=color, linestyle=style, marker="o", ms=3, label=label)
            ax.set_xticks(range(len(values)))
            ax.set_xticklabels([str(v) for v in values], fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_xlabel(sub[0]["hyperparameter"], fontsize=8)
            if ax.has_data():
                ys = [y for line in ax.get_lines() for y in line.get_ydata()]
                if max(ys) / min(ys) > 20:  # several decades: log scale, a few labelled powers of ten
                    ax.set_yscale("log")
                    ax.yaxis.set_major_locator(LogLocator(numticks=5))
                    ax.yaxis.set_minor_formatter(NullFormatter())
            else:
                ax.text(0.5, 0.5, "weights are not a distribution:\nno KL", ha="center", va="center",
                        fontsize=7, transform=ax.transAxes)
            ax.set_title(f"{variant}: {'relative error' if metric == 'rel_err' else 'row KL (nats)'}", fontsize=9)
    handles, labels = report.legend_entries(axes.flat)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8)
    fig.suptitle(f"Error against full attention as the budget grows (N={cfg.seq_len}, preset {cfg.preset}; "
                 f"mean ± std over {len(cfg.seeds)} seeds)", fontsize=10)
    # fixed margins: tight_layout measured several seconds on this grid
    height = 2.6 * 2 * grid_rows
    fig.subplots_adjust(left=0.06, right=0.98, top=1 - 0.6 / height, bottom=0.9 / height, hspace=0.55, wspace=0.3)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)


def write_outputs(cfg: ApproxConfig, rows: list[dict], skipped: list[dict], panels: dict, out: Path,
                  extra: dict | None = None) -> None:
    extra = extra or {}
    rows = [r for r in rows if r]
    report.write_atomic(out / "table.md", markdown(cfg, rows, skipped, extra))
    report.write_csv(out / "rows.csv", rows)
    report.write_json(out / "rows.json", {
        "environment": report.environment(cfg.preset),
        "config": dataclasses.asdict(cfg),
        "budgets": BUDGETS,
        "trained_model": extra,
        "skipped": skipped,
        "rows": rows,
    })
    _plot_budgets(cfg, rows, out / "error_vs_budget.png")
    patterns.draw_patterns(
        out / "patterns.png", panels,
        title=f"Implied attention weights (head 0), N={cfg.pattern_len}, structured q, k; colour scale = full's max",
    )


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Error of every attention variant against full attention, by budget.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--variants", help="comma-separated variant names (default: every registered variant)")
    p.add_argument("--plugin", action="append", default=[], help="a Python file that registers variants")
    p.add_argument("--force", action="store_true", help="recompute finished rows")
    p.add_argument("--out", type=Path, help="output directory (default results/approximation/<preset>)")
    p.add_argument("--no-trained", action="store_true", help="skip input (b), the trained model's q, k, v")
    p.add_argument("--no-progress", action="store_true", help="no running row count")
    args = p.parse_args(argv)
    for path in args.plugin:
        load_plugin(path)
    cfg = PRESETS[args.preset]()
    if args.variants:
        cfg = dataclasses.replace(cfg, variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()))
    if args.no_trained:
        cfg = dataclasses.replace(cfg, trained=None)
    out = args.out or Path("results") / "approximation" / cfg.preset
    t0 = time.perf_counter()
    rows = run(cfg, out, force=args.force, progress=not args.no_progress)
    errors = [r for r in rows if r and r.get("status") == "error"]
    print(f"approximation ({cfg.preset}): {len(rows)} rows in {out} ({time.perf_counter() - t0:.0f} s)"
          + (f"; {len(errors)} errors" if errors else ""))
    return 1 if errors else 0
