"""The approximation sweep's inputs: Gaussian q, k, v; those of a trained exact model; and the
keys a shared-QK variant is compared on."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_attn import registry
from efficient_attn.core import Mask
from efficient_attn.ops.reference.lsh import not_self_unless_alone, shared_qk_keys
from efficient_attn.ops.reference.softmax import visibility
from efficient_attn.sweeps.approximation.config import ApproxConfig
from efficient_attn.sweeps.approximation.plan import unit_key

__all__ = ["gaussian", "trained_inputs", "shared_qk"]


def gaussian(cfg: ApproxConfig, seed: int, scale: float):
    """q, k, v ``[batch, seq_len, heads, head_dim]``, standard normal, q times ``scale``."""
    kq, kk, kv = jax.random.split(jax.random.key(1000 + seed), 3)
    shape = (cfg.batch, cfg.seq_len, cfg.num_heads, cfg.head_dim)
    q = jax.random.normal(kq, shape) * scale
    return q, jax.random.normal(kk, shape), jax.random.normal(kv, shape)


def _capture_trained(cfg: ApproxConfig, log=print) -> dict:
    """Train a small Classifier on the exact reference over ``t.task``; capture (q, k, v, mask) at ``t.layer``."""
    from efficient_attn import tasks
    from efficient_attn.nn import Classifier, EncoderConfig
    from efficient_attn.train import TrainConfig, train

    t = cfg.trained
    t0 = time.perf_counter()
    data = tasks.load(t.task, seq_len=cfg.seq_len - 1, num_train=t.num_train, num_val=200, num_test=200, seed=0,
                      **dict(t.task_params))
    enc = EncoderConfig(vocab_size=data.vocab_size, max_len=data.seq_len, num_classes=data.num_classes,
                        num_layers=t.num_layers, emb_dim=cfg.num_heads * cfg.head_dim, num_heads=cfg.num_heads,
                        mlp_dim=t.mlp_dim, pool="cls", attention=registry.exact_reference())
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
    log(f"  trained {enc.attention} Classifier on {t.task} (N={data.seq_len}, {t.steps} steps): test accuracy "
        f"{result.test:.3f} in {time.perf_counter() - t0:.0f} s")
    return {"q": seen["q"], "k": seen["k"], "v": seen["v"], "mask": seen["mask"],
            "test_accuracy": float(result.test), "majority": float(np.bincount(np.asarray(data.test.targets)).max()
                                                                    / len(data.test))}


def trained_inputs(cfg: ApproxConfig, path: Path, force: bool, log) -> dict:
    """The trained model's q, k, v, mask, test accuracy and majority-class rate, cached in
    ``path`` (an npz keyed by the trained setting, so a rerun does not train again)."""
    ident = unit_key(cfg, {"input": "trained", "variant": "", "hyperparameter": None, "value": None,
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


def trained_summary(path: Path) -> dict:
    """{test_accuracy, majority} of the cached trained model ({} when there is none)."""
    if not path.exists():
        return {}
    with np.load(path) as z:
        return {"test_accuracy": float(z["test_accuracy"]), "majority": float(z["majority"])}


def shared_qk(q, mask: Mask | None):
    """Keys k_j = q_j / ||q_j|| and the mask for full attention that excludes self unless alone.

    Variants whose keys are their normalised queries (``Capabilities.shared_qk``; the k they
    are given is unused) are compared with exact attention on these keys -- the function they
    approximate -- since against exact attention on an independent k their error is ~1 at
    any budget. Both halves are the dense LSH reference's (``ops/reference/lsh.py``: its
    ``shared_qk_attention`` is ``full`` on these keys under this mask).
    """
    B, T = q.shape[:2]
    m = mask or Mask()
    vis = visibility(Mask(causal=m.causal, kv_mask=m.kv_mask), B, T, T)
    return shared_qk_keys(q), Mask(causal=m.causal, kv_mask=m.kv_mask, q_mask=m.q_mask,
                                   dense=not_self_unless_alone(vis))
