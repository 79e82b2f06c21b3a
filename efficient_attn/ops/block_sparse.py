"""Block-sparse softmax attention: each query block attends to a listed set of key blocks.

The engine behind ``local``, ``sparse_transformer``, ``longformer``, ``bigbird`` and
``reformer``. Queries are cut into ``num_q_blocks = ceil(T / block_q)`` blocks of ``block_q``
consecutive rows, keys into ``ceil(S / block_k)`` blocks of ``block_k`` rows (the tails are
padded and the padding is never visible). An integer ``table`` lists, for every query block,
the key blocks it sees:

    table: [num_q_blocks, r]  or  [H, num_q_blocks, r] (one pattern per head), -1 = no block

For query block ``I`` the engine gathers the ``r`` listed key/value blocks, forms the
``[block_q, r * block_k]`` logits ``s_ij = scale * q_i . k_j``, applies the in-block masks
below and takes a softmax over the gathered keys:

    out_i = sum_j p_ij v_j,   p_ij = exp(s_ij - lse_i) [j visible],
    lse_i = log sum_{j visible} exp(s_ij)          (-inf when nothing is visible; out_i = 0)

Options of the softmax family, native here:

- grouped-query attention: k and v have Hkv heads dividing H; query head h reads kv head
  h // G (G = H / Hkv), k and v are never repeated per query head. With one table for all
  heads, the G query heads of a group become G x block_q rows of each query block of their
  kv head (``_fold_group``), so each kv head's blocks are gathered once for its group; with
  a table per head, each query head gathers its own blocks from its kv head by index. The
  backward of the gather sums a shared head's gradient over its group;
- ``softcap`` c: s_ij -> c tanh(s_ij / c) before the masks (the backward multiplies by
  1 - tanh^2);
- ``sinks`` [H]: a value-less logit per query head in the denominator of every row that
  sees a key, lse_i -> logaddexp(lse_i, sink_h) and out_i -> out_i exp(lse_i - lse_i')
  (``add_sinks``; a caller that merges several engine calls with ``merge_softmax`` adds the
  sink once, after the merge).

Time is O(T r block_k d); the [T, S] matrix is never formed. Query blocks are processed in
runs of bounded size (``CHUNK_ELEMENTS``, one run after another), so beyond the O((T + S) d)
inputs, outputs and saved statistics, temporary memory is O(max(run budget, block_q r
block_k)) rather than O(T r block_k). ``table`` may be a NumPy array (static, e.g. a band) or a JAX array (e.g. BigBird's random blocks read from a
module variable); entries must be -1 or in [0, num_k_blocks) and list each block at most once
per row (a repeated block would be counted twice in the softmax).

In-block masks (all optional, combined with AND):

- validity: key rows past ``S`` (padding) and ``kv_valid == False`` keys are invisible;
- ``causal``: ``k_pos <= q_pos``, on *token positions*. Positions default to ``arange``; a
  caller that permutes its sequence (Reformer sorts tokens by hash bucket) passes the
  original positions in ``q_pos``/``k_pos`` so causality holds on the original order;
- ``q_seg``/``k_seg``: key visible only when its segment id equals the query's;
- ``band=(left, right)``: key visible only when ``i - left <= j <= i + right`` in the
  engine's own (row index) coordinates, i.e. a sliding window over the sequence as given;
- ``self_mode``: ``"exclude"`` hides the key whose position equals the query's;
  ``"fallback"`` (Reformer) subtracts ``SELF_PENALTY`` from that logit, so a query attends
  to itself only when no other key is visible (then ``lse`` carries the penalty, which
  makes such a row lose any later ``merge_softmax`` against a row that saw something else).

``merge_softmax`` combines partial results computed over disjoint key sets into the exact
softmax over their union (by logsumexp weighting); variants use it to add global keys to a
local pattern and Reformer to combine its hash rounds.

Non-finite inputs (the rules of ``ops.masks``): whether a query sees a key is read from the
visibility, never from the normaliser, so a NaN in q or k gives that row NaN (out and lse),
not zeros; keys that ``kv_valid`` hides are zeroed before any product, and a value row with
a NaN or Inf entry is zeroed and its key made NaN, so that it poisons exactly the queries
that see it (a causal past row in the same block never multiplies it).

Gradients: a custom VJP recomputes each block's logits in the backward pass from q, k and
the saved ``lse`` (as FlashAttention does), so a forward+backward keeps O(N d) residuals
rather than the O(N r b) probabilities. (Reverse mode only: no ``jax.jvp``.)

Layout inside this module is head-major: q [B, H, T, D], k [B, H, S, D], v [B, H, S, E].
The readable twin (a dense masked softmax built from the same table) is
``ops.reference.softmax.block_sparse_reference``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "SELF_PENALTY",
    "add_sinks",
    "band_block_size",
    "banded_table",
    "block_sparse_attention",
    "merge_softmax",
    "num_blocks",
    "pad_rows",
]

SELF_PENALTY = 1.0e5
"""Subtracted from a query's logit on itself under ``self_mode="fallback"`` (as trax does)."""


def num_blocks(length: int, block: int) -> int:
    """``ceil(length / block)``."""
    return -(-length // block)


def band_block_size(reach: int, length: int) -> int:
    """A tile for a sliding window reaching ``reach`` tokens: ``reach`` clipped to [16, 128], <= length.

    Tiles near the reach keep the gathered keys per query near ``2 * reach`` (about
    ``2 reach + 3 b`` at worst) without degenerating into tiny blocks for small windows.
    """
    return max(1, min(max(reach, 16), 128, length))


def banded_table(
    num_q_blocks: int, num_k_blocks: int, block_q: int, block_k: int, left: int, right: int
) -> np.ndarray:
    """Key blocks overlapping rows ``[I*block_q - left, (I+1)*block_q - 1 + right]``, -1 padded.

    With ``band=(left, right)`` in the engine, this table covers exactly the sliding window
    ``i - left <= j <= i + right``: O(T (left + right + block)) work.
    """
    rows = []
    for i in range(num_q_blocks):
        lo = max(0, i * block_q - left) // block_k
        hi = min(num_k_blocks * block_k - 1, (i + 1) * block_q - 1 + right) // block_k
        rows.append(list(range(lo, hi + 1)) if hi >= lo else [])
    return pad_rows(rows)


def pad_rows(rows: Sequence[Sequence[int]]) -> np.ndarray:
    """A ragged list of key-block lists as an int32 table padded with -1 (at least 1 column)."""
    width = max([1] + [len(r) for r in rows])
    table = np.full((len(rows), width), -1, dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r)] = np.asarray(r, dtype=np.int32)
    return table


def _pad_axis(x, axis: int, new: int, value):
    extra = new - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _as_bht(x, name: str, B: int, H: int, L: int):
    """Broadcastable [L], [B, L] -> [1|B, 1|H, L] (a [B?, H?, L] array passes through)."""
    x = jnp.asarray(x)
    if x.ndim == 1:
        x = x[None, None]
    elif x.ndim == 2:
        x = x[:, None]
    if x.ndim != 3 or x.shape[-1] != L or x.shape[0] not in (1, B) or x.shape[1] not in (1, H):
        raise ValueError(f"block_sparse_attention: {name} must broadcast to [{B}, {H}, {L}], got {x.shape}")
    return x


def _gather_blocks(x, table, per_head: bool, num_heads: int, group: int):
    """x: [b, 1|Hkv, nk, bk, ...]; table: [nq, r] or [H, nq, r] -> [b, 1|H, nq, r, bk, ...].

    Query head h reads kv head h // group: one gather by index, so no per-query-head copy
    of k or v exists beyond the gathered blocks themselves (as without grouping)."""
    if not per_head and (group == 1 or x.shape[1] == 1):
        return x[:, :, table]
    kv_head = jnp.arange(num_heads) // group if x.shape[1] > 1 else jnp.zeros((num_heads,), jnp.int32)
    rows = table if per_head else table[None]
    return x[:, kv_head[:, None, None], rows]


def _scatter_add_blocks(acc, blocks, table, per_head: bool, num_heads: int, group: int):
    """The transpose of ``_gather_blocks``, added in place: acc [b, Hkv, nk, bk, ...] +=
    blocks [b, H, nq, r, bk, ...] at the key blocks ``table`` lists (a block listed twice, or
    read by several query heads of its group, gets the sum).

    Adding into the running accumulator, instead of transposing the gather into a fresh
    zero array and adding that, keeps each run of the backward pass at the cost of the
    blocks it touched: a full-size array per run made the backward O(N * runs), quadratic."""
    if not per_head and (group == 1 or acc.shape[1] == 1):
        return acc.at[:, :, table].add(blocks)
    kv_head = jnp.arange(num_heads) // group if acc.shape[1] > 1 else jnp.zeros((num_heads,), jnp.int32)
    rows = table if per_head else table[None]
    return acc.at[:, kv_head[:, None, None], rows].add(blocks)


def _fold_group(x, group: int):
    """[b, H, nq, bq, ...] -> [b, H / group, nq, group * bq, ...]: the query heads that read one
    kv head become more rows of each of its query blocks (head-major within a block), so that
    with a shared table their keys are gathered once per kv head, not once per query head."""
    b, H, nq, bq = x.shape[:4]
    x = x.reshape((b, H // group, group, nq, bq) + x.shape[4:])
    return jnp.moveaxis(x, 2, 3).reshape((b, H // group, nq, group * bq) + x.shape[5:])


def _unfold_group(x, group: int):
    """Inverse of ``_fold_group``: [b, Hkv, nq, group * bq, ...] -> [b, Hkv * group, nq, bq, ...]."""
    b, Hkv, nq, rows = x.shape[:4]
    x = x.reshape((b, Hkv, nq, group, rows // group) + x.shape[4:])
    return jnp.moveaxis(x, 3, 2).reshape((b, Hkv * group, nq, rows // group) + x.shape[5:])


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable settings of one engine call (the custom VJP's non-differentiable argument)."""

    block_q: int
    block_k: int
    causal: bool
    band: tuple[int, int] | None
    self_mode: str | None
    scale: float
    per_head: bool
    num_heads: int = 1
    group: int = 1
    softcap: float | None = None


def _flat_keys(x, tbl, cfg: _Static):
    """Gather key blocks and flatten them: [b, h, nk, bk, ...] -> [b, h, nq, r * bk, ...]."""
    g = _gather_blocks(x, tbl, cfg.per_head, cfg.num_heads, cfg.group)
    return g.reshape(g.shape[:3] + (g.shape[3] * g.shape[4],) + g.shape[5:])


def _logits_and_visibility(qb, kb, aux, cfg: _Static):
    """Scaled (and soft-capped) logits [B, H, nq, bq, r * bk] of the gathered keys, which of
    them are visible, and the soft cap's derivative ``1 - tanh^2`` (None without a cap).

    ``qb`` and the query-side entries of ``aux`` may be a run of query blocks (the band reads
    each query row's absolute index from ``aux["q_row"]``).
    """
    tbl = aux["table"]
    kg = _flat_keys(kb, tbl, cfg)
    logits = jnp.einsum("bhqid,bhqjd->bhqij", qb, kg) * cfg.scale
    d_cap = None
    if cfg.softcap is not None:  # before the fallback penalty, which must stay a large shift
        t = jnp.tanh(logits / cfg.softcap)
        logits, d_cap = cfg.softcap * t, 1.0 - t * t
    slot_ok = jnp.repeat(aux["slot_ok"], cfg.block_k, axis=-1)[..., None, :]  # [(H,) nq, 1, r*bk]
    vis = jnp.logical_and(_flat_keys(aux["valid"], tbl, cfg)[..., None, :], slot_ok)
    if aux["q_pos"] is not None:
        qp, kp = aux["q_pos"][..., None], _flat_keys(aux["k_pos"], tbl, cfg)[..., None, :]
        if cfg.causal:
            vis = jnp.logical_and(vis, kp <= qp)
        if cfg.self_mode == "exclude":
            vis = jnp.logical_and(vis, kp != qp)
        elif cfg.self_mode == "fallback":
            logits = jnp.where(kp == qp, logits - SELF_PENALTY, logits)
    if aux["q_seg"] is not None:
        vis = jnp.logical_and(vis, aux["q_seg"][..., None] == _flat_keys(aux["k_seg"], tbl, cfg)[..., None, :])
    if cfg.band is not None:
        left, right = cfg.band
        qi = aux["q_row"][..., None]  # [1, 1|H, nq, bq, 1]
        kj = (tbl[..., None] * cfg.block_k + jnp.arange(cfg.block_k)).reshape(tbl.shape[:-1] + (1, -1))
        vis = jnp.logical_and(vis, jnp.logical_and(kj >= qi - left, kj <= qi + right))
    return logits, vis, d_cap


CHUNK_ELEMENTS: int | None = None
"""Query blocks are processed in runs whose logits hold about this many floats, one run after
another (a loop writing each run's rows in place), so temporaries stop growing with N once N is large.
None: 2**18 (1 MiB per logits-sized buffer) on CPU, 2**24 on accelerators, where larger runs
keep the device busy. The backward pass, which holds about twice as many logits-sized
buffers per run (p, dP, dS and their transposes), uses half. A run holds at least one query
block.

Why 2**18 on CPU: a run's few logits-sized buffers then stay within a core's L2 cache (2 MiB
per core on the machine the tables were measured on); at 2**20 they spilled to L3 and a
16K-token call ran 10-40% slower than at 2**18, which made time grow faster than N between
1K (one short run) and 16K (many). The figures are in results/cost/quick/NOTES.md."""


def run_budget(backward: bool = False) -> int:
    """The number of logits elements per run (``CHUNK_ELEMENTS`` or the backend's default),
    halved for the backward pass."""
    budget = CHUNK_ELEMENTS if CHUNK_ELEMENTS is not None else 1 << 18 if jax.default_backend() == "cpu" else 1 << 24
    return max(1, budget // 2) if backward else budget


_Q_KEYS = ("table", "slot_ok", "q_pos", "q_seg", "q_row")  # per-query-block entries of aux


def _blocks_per_run(qb, aux, cfg: _Static, *, backward: bool = False) -> int:
    B, H, nq, bq = qb.shape[:4]
    per_block = B * H * bq * aux["table"].shape[-1] * cfg.block_k
    widest = max(1, min(nq, run_budget(backward) // max(per_block, 1)))
    # the same number of runs, each as short as it can be: the forward's last run overlaps
    # the one before it (_run_start), the backward's is padded (_split_runs); either way fewer
    # blocks are computed twice or for nothing than at the widest length
    return -(-nq // num_blocks(nq, widest))


def _split_runs(qb, aux, run: int):
    """Cut the query-block axis into runs: arrays get a leading run axis (padded rows see nothing).

    The backward's form: its inputs (q, out, dO, lse, dlse) cut into contiguous per-run slices
    and a scan over them ran 3-14% faster than slicing each run from the full arrays inside a
    loop (longformer, local, bigbird fwd+bwd at 4K and 16K, one process); the copies are of
    O(N d) arrays the backward holds anyway."""
    nq = qb.shape[2]
    n = num_blocks(nq, run)

    def cut(x, axis, fill):
        x = _pad_axis(x, axis, n * run, fill)
        x = x.reshape(x.shape[:axis] + (n, run) + x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis, 0)

    q_aux = {
        "table": cut(aux["table"], aux["table"].ndim - 2, 0),
        "slot_ok": cut(aux["slot_ok"], aux["slot_ok"].ndim - 2, False),
        "q_pos": None if aux["q_pos"] is None else cut(aux["q_pos"], 2, -1),
        "q_seg": None if aux["q_seg"] is None else cut(aux["q_seg"], 2, -1),
        "q_row": None if aux["q_row"] is None else cut(aux["q_row"], 2, -1),
    }
    return cut(qb, 2, 0.0), q_aux, n


def _join_runs(x, nq: int):
    """Inverse of ``_split_runs`` for an output [n, B, H, run, ...] -> [B, H, nq, ...]."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])[:, :, :nq]


def _run_start(i, nq: int, run: int):
    """First query block of run ``i``: runs tile [0, nq) in steps of ``run``, the last one moved
    back to end at ``nq``, so that no input is padded (an N-sized copy) to a multiple of ``run``.
    Its first blocks are then ones an earlier run already did ("stale")."""
    return jnp.minimum(i * run, nq - run)


def _take_run(qb, aux, start, run: int):
    """Run ``[start, start + run)`` of the query-block axis of ``qb`` and the per-query entries of aux."""
    take = lambda x, axis: None if x is None else jax.lax.dynamic_slice_in_dim(x, start, run, axis)  # noqa: E731
    q_aux = {key: take(aux[key], aux[key].ndim - 2 if key in ("table", "slot_ok") else 2) for key in _Q_KEYS}
    return take(qb, 2), {**aux, **q_aux}


def _forward_run(qb, kb, vb, aux, cfg: _Static):
    logits, vis, _ = _logits_and_visibility(qb, kb, aux, cfg)
    masked = jnp.where(vis, logits, -jnp.inf)
    m = jnp.max(masked, axis=-1, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)  # nothing visible: any finite shift; NaN stays NaN
    e = jnp.exp(masked - m)  # exactly 0 where invisible
    denom = jnp.sum(e, axis=-1, keepdims=True)
    seen = jnp.any(vis, axis=-1, keepdims=True)  # from the masks: a NaN denominator is not "unseen"
    out = jnp.einsum("bhqij,bhqje->bhqie", e, _flat_keys(vb, aux["table"], cfg)) / jnp.where(seen, denom, 1.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)[..., 0]
    return out, lse


def _forward(qb, kb, vb, aux, cfg: _Static):
    run = _blocks_per_run(qb, aux, cfg)
    nq = qb.shape[2]
    if run >= nq:
        return _forward_run(qb, kb, vb, aux, cfg)

    # each run writes its rows into the full-length outputs in place (a loop carry), so the
    # loop keeps no stacked per-run outputs and no transposed copy of them; a stale block of
    # the last run is recomputed from the same inputs and written again
    def one_run(start):
        q_i, aux_i = _take_run(qb, aux, start, run)
        return _forward_run(q_i, kb, vb, aux_i, cfg)

    def body(i, acc):
        start = _run_start(i, nq, run)
        return tuple(jax.lax.dynamic_update_slice_in_dim(a, x, start, 2) for a, x in zip(acc, one_run(start)))

    acc = tuple(jnp.zeros(x.shape[:2] + (nq,) + x.shape[3:], x.dtype) for x in jax.eval_shape(one_run, 0))
    return jax.lax.fori_loop(0, num_blocks(nq, run), body, acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(qb, kb, vb, aux, cfg: _Static):
    return _forward(qb, kb, vb, aux, cfg)


def _attend_fwd(qb, kb, vb, aux, cfg):
    out, lse = _forward(qb, kb, vb, aux, cfg)
    return (out, lse), (qb, kb, vb, aux, out, lse)


def _backward_run(qb, kb, vb, aux, cfg: _Static, out, lse, d_out, d_lse, dk_acc, dv_acc):
    """Gradients of one run of query blocks: dq of the run, and dk/dv over all key blocks
    (the run's contributions added into ``dk_acc``/``dv_acc``, where only its blocks change).

    dS_ij = p_ij (dP_ij - delta_i + dlse_i),  dP = dO V^T,  delta_i = sum_e dO_ie out_ie,
    with p recomputed from the logits and the saved lse (times 1 - tanh^2 under a soft cap).
    """
    logits, vis, d_cap = _logits_and_visibility(qb, kb, aux, cfg)
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)[..., None]  # unseen rows: p = 0; NaN rows stay NaN
    p = jnp.where(vis, jnp.exp(jnp.where(vis, logits, 0.0) - lse_safe), 0.0)
    vg = _flat_keys(vb, aux["table"], cfg)
    dp = jnp.einsum("bhqie,bhqje->bhqij", d_out, vg)
    delta = jnp.sum(d_out * out, axis=-1, keepdims=True)
    ds = p * (dp - delta + d_lse[..., None])
    if d_cap is not None:  # where, not a product: an invisible NaN key has a NaN derivative
        ds = jnp.where(vis, ds * d_cap, 0.0)
    ds = ds * cfg.scale
    kg = _flat_keys(kb, aux["table"], cfg)
    dq = jnp.einsum("bhqij,bhqjd->bhqid", ds, kg)
    # dk = ds^T q and dv = p^T dO from ds^T and p^T made explicit: XLA folds a plain transpose
    # into the matmul, whose CPU kernel is 2-3x slower with the contraction on the rows of a
    # small block than with a transposed copy (the barrier keeps the copy)
    ds_t, p_t = jax.lax.optimization_barrier((jnp.swapaxes(ds, -1, -2), jnp.swapaxes(p, -1, -2)))
    dkg = jnp.einsum("bhqji,bhqid->bhqjd", ds_t, qb)
    dvg = jnp.einsum("bhqji,bhqie->bhqje", p_t, d_out)
    blocks = lambda x: x.reshape(x.shape[:3] + (-1, cfg.block_k) + x.shape[4:])  # noqa: E731  [.., r, bk, ..]
    scatter = functools.partial(_scatter_add_blocks, table=aux["table"], per_head=cfg.per_head,
                                num_heads=cfg.num_heads, group=cfg.group)
    return dq, scatter(dk_acc, blocks(dkg)), scatter(dv_acc, blocks(dvg))


def _attend_bwd(cfg, res, cotangents):
    """Recompute the probabilities from (q, k, lse) instead of storing them (as FlashAttention)."""
    qb, kb, vb, aux, out, lse = res
    d_out, d_lse = cotangents
    run = _blocks_per_run(qb, aux, cfg, backward=True)
    nq = qb.shape[2]
    zeros = (jnp.zeros_like(kb), jnp.zeros_like(vb))
    if run >= nq:
        dq, dk, dv = _backward_run(qb, kb, vb, aux, cfg, out, lse, d_out, d_lse, *zeros)
        return dq, dk, dv, None
    q_runs, q_aux, n = _split_runs(qb, aux, run)
    cut = lambda x: jnp.moveaxis(  # noqa: E731
        _pad_axis(x, 2, n * run, 0.0).reshape(x.shape[:2] + (n, run) + x.shape[3:]), 2, 0
    )
    shared = {key: val for key, val in aux.items() if key not in _Q_KEYS}

    def body(carry, xs):
        q_i, aux_i, out_i, lse_i, dout_i, dlse_i = xs
        dq, dk, dv = _backward_run(q_i, kb, vb, {**shared, **aux_i}, cfg, out_i, lse_i, dout_i, dlse_i, *carry)
        return (dk, dv), dq

    xs = (q_runs, q_aux, cut(out), cut(lse), cut(d_out), cut(d_lse))
    (dk, dv), dq = jax.lax.scan(body, zeros, xs)
    return _join_runs(dq, nq), dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def block_sparse_attention(
    q: Float[Array, "B H T D"],
    k: Float[Array, "B Hkv S D"],
    v: Float[Array, "B Hkv S E"],
    table,
    *,
    block_q: int,
    block_k: int,
    causal: bool = False,
    kv_valid: Bool[Array, "B Hk S"] | None = None,
    q_pos: Int[Array, "Bq Hq T"] | None = None,
    k_pos: Int[Array, "Bk Hk S"] | None = None,
    q_seg: Int[Array, "Bq Hq T"] | None = None,
    k_seg: Int[Array, "Bk Hk S"] | None = None,
    band: tuple[int, int] | None = None,
    self_mode: Literal["exclude", "fallback"] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: Float[Array, "H"] | None = None,
) -> tuple[Float[Array, "B H T E"], Float[Array, "B H T"]]:
    """Softmax attention restricted to the key blocks of ``table``; returns ``(out, lse)``.

    ``out`` is float32 and zero where a query sees no key; ``lse`` is the log of the
    softmax normaliser (``-inf`` there). See the module docstring for every option.
    Differentiable in q, k, v (and ``sinks``) by a custom VJP that recomputes the block
    logits in the backward pass, so only q, k, v, out and lse are kept: O(N d) saved, not
    O(N r b). k and v may have Hkv heads dividing H (query head h reads kv head h // (H /
    Hkv)); key-side masks (``kv_valid``, ``k_pos``, ``k_seg``) then have 1 or Hkv heads.
    """
    B, H, T, D = q.shape
    Hkv, S, E = k.shape[1], k.shape[2], v.shape[3]
    if k.ndim != 4 or k.shape[0] != B or k.shape[3] != D or v.shape[:3] != (B, Hkv, S) or H % Hkv:
        raise ValueError(
            f"block_sparse_attention: q {q.shape}, k {k.shape}, v {v.shape} do not agree (head-major [B, H, T, D], "
            "[B, Hkv, S, D], [B, Hkv, S, E] with Hkv dividing H)"
        )
    if self_mode not in (None, "exclude", "fallback"):
        raise ValueError(f'block_sparse_attention: self_mode must be None, "exclude" or "fallback", got {self_mode!r}')
    if (q_seg is None) != (k_seg is None):
        raise ValueError("block_sparse_attention: give both q_seg and k_seg, or neither")
    if softcap is not None and not (float(softcap) > 0 and math.isfinite(float(softcap))):
        raise ValueError(f"block_sparse_attention: softcap must be a finite number > 0, got {softcap}")
    if sinks is not None and jnp.shape(sinks) != (H,):
        raise ValueError(f"block_sparse_attention: sinks must have shape [{H}] (one logit per query head), got {jnp.shape(sinks)}")
    nq, nk = num_blocks(T, block_q), num_blocks(S, block_k)

    per_head = jnp.ndim(table) == 3
    if isinstance(table, np.ndarray):
        if table.shape[-2] != nq or (per_head and table.shape[0] != H):
            raise ValueError(f"block_sparse_attention: table {table.shape} needs {nq} query-block rows (T={T}, block_q={block_q})")
        if table.size and (table.min() < -1 or table.max() >= nk):
            raise ValueError(f"block_sparse_attention: table entries must be -1 or in [0, {nk}), got [{table.min()}, {table.max()}]")
    table = jnp.asarray(table, dtype=jnp.int32)
    if table.ndim not in (2, 3) or table.shape[-2] != nq:
        raise ValueError(f"block_sparse_attention: table {table.shape} needs shape [{nq}, r] or [H, {nq}, r]")

    f32 = jnp.float32
    Tp, Sp = nq * block_q, nk * block_k

    def q_side(x, name, fill):
        x = _pad_axis(_as_bht(x, name, B, H, T), 2, Tp, fill)
        return x.reshape(x.shape[:2] + (nq, block_q))

    def k_side(x, name, fill):
        x = _pad_axis(_as_bht(x, name, B, Hkv, S), 2, Sp, fill)
        return x.reshape(x.shape[:2] + (nk, block_k))

    valid = jnp.arange(Sp).reshape(1, 1, nk, block_k) < S  # padding is never visible
    if kv_valid is not None:
        keep = _as_bht(kv_valid, "kv_valid", B, Hkv, S)[..., None]  # [1|B, 1|Hkv, S, 1]
        valid = jnp.logical_and(valid, k_side(kv_valid, "kv_valid", False))
        # hidden keys are read by no product (forward or backward): where, not a product
        k, v = jnp.where(keep, k, jnp.zeros((), k.dtype)), jnp.where(keep, v, jnp.zeros((), v.dtype))
    bad = jnp.logical_not(jnp.all(jnp.isfinite(v), axis=-1, keepdims=True))  # [B, H, S, 1]
    v = jnp.where(bad, jnp.zeros((), v.dtype), v)
    k = jnp.where(bad, jnp.asarray(jnp.nan, k.dtype), k)  # a bad value poisons who sees its key
    qb = _pad_axis(q.astype(f32), 2, Tp, 0.0).reshape(B, H, nq, block_q, D)
    kb = _pad_axis(k.astype(f32), 2, Sp, 0.0).reshape(B, Hkv, nk, block_k, D)
    vb = _pad_axis(v.astype(f32), 2, Sp, 0.0).reshape(B, Hkv, nk, block_k, E)
    need_pos = causal or self_mode is not None
    aux = {
        "table": jnp.clip(table, 0, nk - 1),
        "slot_ok": table >= 0,
        "valid": valid,
        "q_pos": q_side(jnp.arange(T) if q_pos is None else q_pos, "q_pos", -1) if need_pos else None,
        "k_pos": k_side(jnp.arange(S) if k_pos is None else k_pos, "k_pos", -2) if need_pos else None,
        "q_seg": None if q_seg is None else q_side(q_seg, "q_seg", -1),
        "k_seg": None if k_seg is None else k_side(k_seg, "k_seg", -2),
        "q_row": None if band is None else q_side(jnp.arange(T), "q_row", -1),
    }
    G = H // Hkv
    fold = G > 1 and not per_head
    if fold:  # one shared table: the G query heads of a kv head share its gathered blocks
        qb = _fold_group(qb, G)
        aux.update({key: None if aux[key] is None else _fold_group(jnp.broadcast_to(
            aux[key], aux[key].shape[:1] + (H,) + aux[key].shape[2:]), G) for key in ("q_pos", "q_seg", "q_row")})
    cfg = _Static(
        block_q=block_q,
        block_k=block_k,
        causal=bool(causal),
        band=None if band is None else (int(band[0]), int(band[1])),
        self_mode=self_mode,
        scale=float(1.0 / math.sqrt(D) if scale is None else scale),
        per_head=bool(per_head),
        num_heads=Hkv if fold else H,
        group=1 if fold else G,
        softcap=None if softcap is None else float(softcap),
    )
    out, lse = _attend(qb, kb, vb, aux, cfg)
    if fold:
        out, lse = _unfold_group(out, G), _unfold_group(lse, G)
    out, lse = out.reshape(B, H, Tp, E)[:, :, :T], lse.reshape(B, H, Tp)[:, :, :T]
    return (out, lse) if sinks is None else add_sinks(out, lse, sinks)


def add_sinks(
    out: Float[Array, "B H T E"], lse: Float[Array, "B H T"], sinks: Float[Array, "H"]
) -> tuple[Float[Array, "B H T E"], Float[Array, "B H T"]]:
    """``(out, lse)`` of a softmax whose denominator also holds ``exp(sink_h)``, a logit with
    no value, from those of the softmax without it:

        lse' = logaddexp(lse, sink),   out' = out exp(lse - lse')

    Rows that saw nothing (lse = -inf) stay 0 and -inf; a NaN row stays NaN. Differentiable
    (plain autodiff), so the sink gets its gradient -sum_i p_sink,i (dO_i . out'_i - dlse'_i).
    Apply it once, after ``merge_softmax`` of disjoint key sets, never to each part.
    """
    seen = lse != -jnp.inf  # NaN counts as seen, and stays NaN
    safe = jnp.where(seen, lse, 0.0)
    sink = jnp.asarray(sinks, jnp.float32)[None, :, None]
    total = jnp.logaddexp(safe, sink)
    out = jnp.where(seen[..., None], out * jnp.exp(safe - total)[..., None], out)
    return out, jnp.where(seen, total, -jnp.inf)


def merge_softmax(
    outs: Sequence[Float[Array, "... E"]], lses: Sequence[Float[Array, "..."]]
) -> tuple[Float[Array, "... E"], Float[Array, "..."]]:
    """Combine softmax results over disjoint key sets into the softmax over their union.

    ``out = sum_r w_r out_r``, ``w_r = exp(lse_r - logsumexp_r lse_r)``; parts with
    ``lse = -inf`` (saw nothing) get weight 0; a row that saw nothing anywhere stays 0.
    Returns ``(out, lse)`` of the union. Reformer uses the same weighting for hash rounds,
    whose key sets may overlap (a key seen in two rounds then counts twice, as in trax).

    ``outs`` and ``lses`` are sequences of parts (a list, or an array stacked on axis 0, which
    iterates over that axis). The sums over parts are written out one part at a time: XLA's
    CPU reduction over the leading axis of a stacked [n, B, H, T, E] array ran 50x slower
    (166 ms against 3 ms for two parts at B=1 H=8 T=16K E=64; with the backward 258 / 53 ms).
    """
    if len(outs) != len(lses) or len(outs) == 0:
        raise ValueError(f"merge_softmax: needs as many lse parts as out parts, at least one (got {len(outs)}, {len(lses)})")
    lses = list(lses)
    m = functools.reduce(jnp.maximum, lses)  # NaN stays NaN
    m = jax.lax.stop_gradient(jnp.where(m == -jnp.inf, 0.0, m))
    w = [jnp.exp(lse - m) for lse in lses]
    denom = functools.reduce(jnp.add, w)
    seen = functools.reduce(jnp.logical_or, [lse != -jnp.inf for lse in lses])  # a NaN part is seen (and poisons)
    out = functools.reduce(jnp.add, [w_r[..., None] * out_r for w_r, out_r in zip(w, outs)])
    out = out / jnp.where(seen, denom, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)
    return out, lse
