"""What a variant attends to: its implied attention weights, found by probing, and pictures.

Most variants never form the T x S matrix of attention weights A; but every variant here
computes ``out = A(q, k) V`` for some A that does not depend on V (the output is linear in
V). Feeding one-hot values recovers A column by column: with ``V[s, c] = [s == c]``,

    out[t, c] = sum_s A[t, s] V[s, c] = A[t, c].

``implied_weights`` does this for any registered variant, plugins included: the identity
is cut into chunks of ``D`` columns (every variant accepts D_v = D), and the chunks ride
along the batch axis, so one call probes the whole matrix. ``probe`` does the same in
groups of bounded size (long sequences) and returns the output on a real V beside A. It assumes what every built-in
variant satisfies: linear in V, and the same randomness for every batch element of one
call (Performer's redrawn features, Reformer's hashes are drawn per call, not per example).
``probe_consistency`` checks that assumption for a given input (A V against the output on a
real V); a variant that breaks it (an affine or nonlinear function of V) is reported there.

Metrics against "full": ``row_kl`` (mean over visible rows of KL(full || variant), for
weights that are distributions, with a small uniform smoothing so that a key the variant
never attends to costs log(1/eps) nats per unit of full's mass on it, not infinity),
``negative_mass`` (how far implied weights are from a distribution).

``draw_patterns`` puts the implied matrices of several variants side by side with the
reference's (full's).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from efficient_attn.core import Mask

__all__ = [
    "implied_weights",
    "probe",
    "call",
    "probe_batch",
    "split_probe",
    "probe_consistency",
    "row_kl",
    "negative_mass",
    "is_distribution",
    "structured_qk",
    "draw_patterns",
]

KL_SMOOTHING = 1e-6
# ``probe`` sends at most this many (batch x head x query x key) entries through one call:
# 512 MiB of float32 scores for a variant that materialises them.
PROBE_ENTRIES = 2**27


def _tile_mask(mask: Mask | None, reps: int, batch: int) -> Mask | None:
    if mask is None:
        return None

    def tile(x):
        if x is None or x.shape[0] != batch:  # None, or a dense mask broadcast over the batch
            return x
        return jnp.tile(x, (reps,) + (1,) * (x.ndim - 1))

    return Mask(causal=mask.causal, kv_mask=tile(mask.kv_mask), q_mask=tile(mask.q_mask), dense=tile(mask.dense))


def probe_batch(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S H D"],
    mask: Mask | None = None,
    extra_v: Float[Array, "B S H D"] | None = None,
):
    """Inputs of the one call that probes A: (q, k, v, mask) with batch ``B * (C + extra)``.

    Chunk c of the identity (columns ``c D .. c D + D - 1``) is the value of batch block c;
    ``extra_v`` (optional) is appended as one more block, so a real output comes from the
    same call. Returns the inputs and ``C``.
    """
    B, T, H, D = q.shape
    S = k.shape[1]
    C = -(-S // D)
    eye = jnp.eye(S, C * D, dtype=jnp.float32)  # [S, C*D]
    chunks = eye.reshape(S, C, D).transpose(1, 0, 2)  # [C, S, D]
    v = jnp.broadcast_to(chunks[:, None, :, None, :], (C, B, S, H, D)).reshape(C * B, S, H, D)
    reps = C
    if extra_v is not None:
        v = jnp.concatenate([v, extra_v.astype(jnp.float32)], axis=0)
        reps += 1
    v = v.astype(q.dtype)
    tile = lambda x: jnp.tile(x, (reps, 1, 1, 1))  # noqa: E731
    return tile(q), tile(k), v, _tile_mask(mask, reps, B), C


def split_probe(out, B: int, S: int, C: int, has_extra: bool = False):
    """The output of ``probe_batch``'s call -> (A ``[B, H, T, S]``, the extra output or None)."""
    D = out.shape[-1]
    T, H = out.shape[1], out.shape[2]
    a = out[: C * B].astype(jnp.float32).reshape(C, B, T, H, D)
    a = a.transpose(1, 3, 2, 0, 4).reshape(B, H, T, C * D)[..., :S]
    extra = out[C * B :] if has_extra else None
    return a, extra


_COMPILED: dict = {}


def call(module: Callable, q, k, v, mask: Mask | None = None, *, fast_compile: bool = False):
    """``module(q, k, v, mask=mask)``; an ``nnx.Module`` runs through one jitted function per
    module structure (its state is an argument, so modules that differ only in parameter
    values, e.g. seeds, share the compiled code). Other callables are called as they are.

    ``fast_compile``: compile with XLA's backend optimisation level 0, for many small probes:
    compiling is then much faster for slightly slower runs (figures in
    results/approximation/quick/NOTES.md).
    """
    if not isinstance(module, nnx.Module):
        return module(q, k, v, mask=mask)
    graphdef, state = nnx.split(module)
    key = (graphdef, fast_compile)
    if key not in _COMPILED:
        options = {"xla_backend_optimization_level": 0} if fast_compile else None
        _COMPILED[key] = jax.jit(lambda st, q, k, v, m: nnx.merge(graphdef, st)(q, k, v, mask=m),
                                 compiler_options=options)
    return _COMPILED[key](state, q, k, v, mask)


def implied_weights(
    module: Callable,
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S H D"],
    mask: Mask | None = None,
    *,
    fast_compile: bool = False,
) -> Float[Array, "B H T S"]:
    """The attention weights A with ``module(q, k, v, mask=mask) = A V``, in one batched call.

    ``module`` is an ``Attention`` (or any callable with its signature). For "full" this is
    exactly the softmax matrix; for an approximate variant it is the matrix it effectively
    applies (possibly with negative entries, e.g. Linformer's projections). A variant whose
    state changes on every call (Performer's redrawn features) is probed with the state it
    has now; the module itself is not advanced.
    """
    qq, kk, v, m, C = probe_batch(q, k, mask)
    out = call(module, qq, kk, v, m, fast_compile=fast_compile)
    return split_probe(out, q.shape[0], k.shape[1], C)[0]


def probe(
    module: Callable,
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S H D"],
    v: Float[Array, "B S H D"],
    mask: Mask | None = None,
    *,
    fast_compile: bool = False,
    max_entries: int = PROBE_ENTRIES,
) -> tuple[np.ndarray, np.ndarray]:
    """(implied weights ``[B, H, T, S]``, output on ``v`` ``[B, T, H, D]``), both numpy float32.

    The probing batch of ``probe_batch`` (with ``v`` as its extra block) goes through in
    groups of equal size (the last one padded), each small enough that a quadratic variant's
    scores stay under ``max_entries`` entries. The module's state is passed unchanged to every
    group, so randomness drawn per call (Performer's redraw) is the same in all of them.
    """
    qq, kk, vv, mm, C = probe_batch(q, k, mask, extra_v=v)
    total = qq.shape[0]
    group = max(1, min(total, max_entries // (q.shape[2] * q.shape[1] * k.shape[1])))
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
        outs.append(call(module, rows(qq, s), rows(kk, s), rows(vv, s), m, fast_compile=fast_compile))
    out = jnp.concatenate(outs)[:total]
    a, o = split_probe(out, q.shape[0], k.shape[1], C, has_extra=True)
    return np.asarray(a), np.asarray(o, np.float32)


def probe_consistency(weights: Float[Array, "B H T S"], v: Float[Array, "B S H Dv"], out) -> float:
    """||A V - out|| / ||out||: ~1e-6 when the probe is valid (output linear in V)."""
    av = np.einsum("bhts,bshd->bthd", np.asarray(weights, np.float64), np.asarray(v, np.float64))
    o = np.asarray(out, np.float64)
    return float(np.linalg.norm(av - o) / max(np.linalg.norm(o), 1e-30))


def _visible_rows(reference) -> np.ndarray:
    return np.sum(reference, axis=-1) > 0.5  # rows of full that see at least one key


def is_distribution(weights, reference, *, tol: float = 1e-3) -> bool:
    """True when every visible row of ``weights`` is nonnegative and sums to 1 (within tol)."""
    rows = _visible_rows(np.asarray(reference))
    w = np.asarray(weights, np.float64)
    nonneg = bool(np.all(np.where(rows[..., None], w, 0.0) >= -tol / w.shape[-1]))  # float noise only
    sums = np.sum(w, axis=-1)
    return nonneg and bool(np.all(np.where(rows, np.abs(sums - 1.0), 0.0) <= tol))


def negative_mass(weights, reference) -> float:
    """Mean over visible rows of the total negative weight (0 for a distribution)."""
    rows = _visible_rows(np.asarray(reference))
    neg = np.sum(np.minimum(np.asarray(weights, np.float64), 0.0), axis=-1)
    return float(-np.sum(np.where(rows, neg, 0.0)) / max(int(np.sum(rows)), 1))


def row_kl(reference: Float[Array, "B H T S"], weights: Float[Array, "B H T S"], eps: float = KL_SMOOTHING) -> float:
    """Mean over visible rows of KL(reference || weights) in nats.

    ``weights`` is clipped at 0, renormalised over the keys the reference can see, and mixed
    with the uniform distribution over those keys (weight ``eps``), so that the KL is finite
    when a variant gives zero weight to a key that full attention uses.
    """
    p = np.asarray(reference, np.float64)
    support = p > 0
    w = np.where(support, np.maximum(np.asarray(weights, np.float64), 0.0), 0.0)
    w = w / np.maximum(np.sum(w, axis=-1, keepdims=True), 1e-300)
    n = np.maximum(np.sum(support, axis=-1, keepdims=True), 1)
    qs = (1.0 - eps) * w + eps * support / n
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(support, p * (np.log(np.where(support, p, 1.0)) - np.log(np.where(support, qs, 1.0))), 0.0)
    kl = np.maximum(np.sum(terms, axis=-1), 0.0)  # >= 0; rounding can give -1e-9
    rows = _visible_rows(p)
    return float(np.sum(np.where(rows, kl, 0.0)) / max(int(np.sum(rows)), 1))


def structured_qk(n: int, num_heads: int, head_dim: int, *, seed: int = 0, scale: float = 4.0):
    """q, k ``[1, n, H, D]`` whose softmax attention has visible structure.

    Half of each head's width is sinusoidal position features shared by q and k, so that
    their logit is ``scale * mean_f cos(w_f (i - j))``: largest at i = j (``scale``) and
    decaying with |i - j|; the other half is random content whose logits have a standard
    deviation of ``0.3 * scale`` (long-range spikes).
    """
    half = max(head_dim // 2, 2)
    nf = half // 2
    freqs = 2.5 * ((math.sqrt(5) - 1) / 2) ** np.arange(nf)  # incommensurate: no exact repeat of i = j
    pos = np.arange(n)[:, None] * freqs[None]
    feats = np.concatenate([np.sin(pos), np.cos(pos)], axis=-1)  # [n, 2 nf], feats_i . feats_j = sum cos
    c = head_dim - 2 * nf
    a = math.sqrt(scale * math.sqrt(head_dim) / nf)
    b = math.sqrt(0.3 * scale * math.sqrt(head_dim) / math.sqrt(max(c, 1)))
    rng = np.random.default_rng(seed)
    q = np.zeros((1, n, num_heads, head_dim), np.float32)
    k = np.zeros_like(q)
    for h in range(num_heads):
        q[0, :, h, : 2 * nf] = a * feats
        k[0, :, h, : 2 * nf] = a * feats
        q[0, :, h, 2 * nf :] = b * rng.normal(size=(n, c))
        k[0, :, h, 2 * nf :] = b * rng.normal(size=(n, c))
    return jnp.asarray(q), jnp.asarray(k)


def draw_patterns(
    path: str | Path,
    panels: Mapping[str, Mapping[str, np.ndarray | str | None]],
    *,
    modes: tuple[str, ...] = ("bidirectional", "causal"),
    columns: int = 4,
    title: str = "",
    reference: str | None = None,
) -> Path:
    """One PNG: for each variant (``panels[name][mode]`` = a [T, S] matrix, or a string that
    says why there is none; optional ``panels[name]["label"]``, e.g. its hyperparameters),
    its implied weights per mode. The ``reference`` panel (default: the first) comes first,
    and every panel is drawn on its colour scale (clipped there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(panels)
    if reference is None and names:
        reference = names[0]
    if reference in names:
        names.remove(reference)
        names.insert(0, reference)
    vmax = {}
    for mode in modes:
        ref = panels.get(reference, {}).get(mode)
        vmax[mode] = float(np.max(ref)) if isinstance(ref, np.ndarray) else None
    n_rows = -(-len(names) // columns) * len(modes)
    fig, axes = plt.subplots(n_rows, columns, figsize=(2.4 * columns, 2.5 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, name in enumerate(names):
        block, col = divmod(i, columns)
        for j, mode in enumerate(modes):
            ax = axes[block * len(modes) + j, col]
            item = panels[name].get(mode)
            if isinstance(item, np.ndarray):
                top = vmax[mode] if vmax[mode] else float(np.max(item)) or 1.0
                ax.imshow(np.clip(item, 0.0, None), cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
                low = float(np.min(item))
                head = name + (f" ({panels[name]['label']})" if panels[name].get("label") else "")
                label = f"{head}\n{mode}" + (f", min {low:.2g}" if low < -1e-4 else "")
                ax.set_title(label, fontsize=8)
            else:
                ax.text(0.5, 0.5, f"{name}\n{mode}\n{item or 'n/a'}", ha="center", va="center", fontsize=7,
                        transform=ax.transAxes, wrap=True)
    if title:
        fig.suptitle(title, fontsize=10)
    height = 2.5 * n_rows  # fixed margins (tight_layout is slow on large grids)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - (1.1 if title else 0.5) / height, bottom=0.1 / height,
                        hspace=0.45, wspace=0.15)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path
