"""The LRA Table 2 analog, measured: training steps per second and compiled memory of LRA's
byte-level text classifier (``nn.Classifier``, scaled down by the preset) at 1K-4K tokens, for
every variant. ``sweeps/cost/report_table2.py`` sets them beside the published table (Tay et al.
2020, "Long Range Arena", arXiv 2011.04006).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import efficient_attn as ea
from efficient_attn import measure, report
from efficient_attn.sweeps.cost.budgets import Budgets, claimed, is_done
from efficient_attn.sweeps.cost.config import CostConfig
from efficient_attn.sweeps.cost.point import record_error, record_memory, record_timing, skip_over_time_budget
from efficient_attn.sweeps.cost.progress import progress_bar

__all__ = ["TEXT_VOCAB", "TEXT_CLASSES", "measure_train_step", "run_table2", "pending"]

TEXT_VOCAB = 256  # byte-level text
TEXT_CLASSES = 2  # IMDb sentiment


def available() -> str | None:
    """None when efficient_attn.nn / efficient_attn.train provide what Table 2 needs, else why not."""
    try:
        from efficient_attn import nn, train
    except ImportError as err:
        return f"efficient_attn.nn / efficient_attn.train not importable ({err})"
    missing = [f"nn.{a}" for a in ("Classifier", "EncoderConfig") if not hasattr(nn, a)]
    missing += [f"train.{a}" for a in ("TrainConfig", "make_optimizer") if not hasattr(train, a)]
    return f"missing {', '.join(missing)}" if missing else None


def row_key(variant: str, n: int, cfg: CostConfig) -> str:
    t = cfg.table2
    return report.RowStore.make_key("table2", variant, n, t.batch, t.num_layers, t.emb_dim, t.num_heads, t.mlp_dim)


def _budget(cfg: CostConfig) -> dict[str, Any]:
    t = cfg.table2
    return {"max_call_s": t.max_step_s, "max_compile_s": cfg.max_compile_s,
            "memory_budget_bytes": t.memory_budget_bytes}


def points(cfg: CostConfig, variants: Sequence[str]) -> list[tuple[str, int]]:
    return [(name, n) for n in dict.fromkeys(cfg.table2.lengths) for name in variants]  # in the config's order


def pending(cfg: CostConfig, variants: Sequence[str], store: report.RowStore) -> int:
    """How many Table 2 points a run would measure (0 when disabled or not available)."""
    if not cfg.table2.enabled or available() is not None:
        return 0
    budget = _budget(cfg)
    return sum(not is_done(store.get(row_key(name, n, cfg)), budget) for name, n in points(cfg, variants))


def _train_step_function(name: str, n: int, cfg: CostConfig):
    """(step, args): one optimiser step of the byte-level text classifier with variant ``name``.

    The model is ``nn.Classifier`` (LRA's encoder) with mean pooling, so that the attention
    sees exactly ``n`` positions (CLS pooling would make it n + 1, which block-based variants
    pad); no padding mask, since every variant must run and random bytes fill every position
    (the cost does not depend on the bytes). ``fast_exact=False``: the exact reference's row
    is the quadratic einsum Transformer, as in LRA's table, not its fast twin. The optimiser
    is ``train.make_optimizer`` with LRA's text settings (lr 0.05 with rsqrt decay, weight
    decay 0.1, warm-up 8000).
    """
    from efficient_attn import nn, train

    t = cfg.table2
    ecfg = nn.EncoderConfig(vocab_size=TEXT_VOCAB, max_len=n, num_classes=TEXT_CLASSES, num_layers=t.num_layers,
                            emb_dim=t.emb_dim, num_heads=t.num_heads, mlp_dim=t.mlp_dim, pool="mean", attention=name,
                            fast_exact=False)
    model = nn.Classifier(ecfg, rngs=nnx.Rngs(cfg.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = train.make_optimizer(train.TrainConfig(lr=0.05, weight_decay=0.1, warmup=8000, steps=20000,
                                                batch_size=t.batch, schedule="rsqrt"))
    opt_state = tx.init(params)
    rng = np.random.default_rng(cfg.seed)
    tokens = jnp.asarray(rng.integers(0, TEXT_VOCAB, (t.batch, n)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, TEXT_CLASSES, (t.batch,)), jnp.int32)

    def step(params, opt_state, rest, tokens, labels):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, (params, opt_state, rest, tokens, labels)


def _row(name: str, n: int, cfg: CostConfig, status: str, reason: str) -> dict[str, Any]:
    t = cfg.table2
    spec = ea.get_spec(name)
    return {
        "kind": "table2", "variant": name, "n": n, "pass": "train_step", "causal": False, "status": status,
        "reason": reason, "family": spec.family, "exact": spec.capabilities.exact,
        "claimed_time": spec.capabilities.time, "claimed_memory": spec.capabilities.memory,
        "batch": t.batch, "num_layers": t.num_layers, "emb_dim": t.emb_dim, "heads": t.num_heads,
        "mlp_dim": t.mlp_dim, "dtype": "float32", "time_median_s": None, "time_spread": None,
        "steps_per_s": None, "repeats": 0, "compile_s": None, "memory_bytes": None, "temp_bytes": None,
        "max_call_s": t.max_step_s, "max_compile_s": cfg.max_compile_s, "memory_budget_bytes": t.memory_budget_bytes,
    }


def _skipped_row(name: str, n: int, cfg: CostConfig, reason: str) -> dict[str, Any]:
    """A point not reached (deadline, or its series over a budget): what it is, no figures."""
    t = cfg.table2
    return {"kind": "table2", "variant": name, "n": n, "pass": "train_step", "causal": False,
            "status": "skipped", "reason": reason, "family": ea.get_spec(name).family, "batch": t.batch,
            "num_layers": t.num_layers, "emb_dim": t.emb_dim, "heads": t.num_heads, "mlp_dim": t.mlp_dim,
            "dtype": "float32", "max_call_s": t.max_step_s, "max_compile_s": cfg.max_compile_s,
            "memory_budget_bytes": t.memory_budget_bytes}


def measure_train_step(name: str, n: int, cfg: CostConfig, *, predicted_s: tuple[float, float] | None = None,
                       from_n: int | None = None) -> dict[str, Any]:
    """Steps per second and compiled memory of one training step; never raises for a variant."""
    t = cfg.table2
    row = _row(name, n, cfg, "ok", "")
    if not ea.get_spec(name).capabilities.bidirectional:
        row.update(status="skipped", reason=(
            "causal only (capabilities.bidirectional=False): the Table 2 model is LRA's bidirectional "
            "text encoder"))
        return row
    if skip_over_time_budget(row, predicted_s, from_n, t.max_step_s, per="step", flag="max_step_s"):
        return row
    try:
        fn, args = _train_step_function(name, n, cfg)
        compiled, compile_s = measure.compile_function(fn, *args)
        row["compile_s"] = compile_s
        if record_memory(row, compiled, t.memory_budget_bytes, "compiled step"):
            return row
        timing = measure.time_compiled(compiled, *args, warmup=t.warmup, min_repeats=t.min_repeats,
                                       max_repeats=t.max_repeats, budget_s=t.step_budget_s, compile_s=compile_s)
        record_timing(row, timing)
        row.update(steps_per_s=1.0 / timing.median_s, device_peak_bytes=measure.device_peak_bytes())
    except Exception as err:  # noqa: BLE001 - one variant's failure must not stop the sweep
        record_error(row, err)
    return row


def run_table2(cfg: CostConfig, variants: Sequence[str], store: report.RowStore, *, force: bool = False,
               progress: bool = True) -> None:
    """Training steps/s and compiled memory of the text classifier per variant and length (in ``store``)."""
    why = available()
    if why is not None:
        print(f"cost: LRA Table 2 analog not run: {why}", file=sys.stderr)
        return
    t = cfg.table2
    budgets = Budgets(cfg.max_compile_s)
    budget = _budget(cfg)
    todo = points(cfg, variants)
    bar = progress_bar(len(todo), progress, "table2")
    t_start = time.perf_counter()
    try:
        for name, n in todo:
            key = row_key(name, n, cfg)
            bar.set_postfix_str(f"{name} N={n} train step")
            prev = store.get(key)
            if not force and is_done(prev, budget):
                budgets.remember(prev, (name,), "time_median_s")
                bar.update(1)
                continue
            reason = budgets.skip_reason((name,), n, t_start, t.budget_s)
            if reason is not None:
                row = _skipped_row(name, n, cfg, reason)
            else:
                predicted, from_n = budgets.predict((name,), n, claimed(ea.get_spec(name), "time"))
                row = measure_train_step(name, n, cfg, predicted_s=predicted, from_n=from_n)
            store.add(key, row)
            budgets.remember(row, (name,), "time_median_s")
            bar.update(1)
    finally:
        bar.close()
