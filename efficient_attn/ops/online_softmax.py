"""Exact attention by an online softmax over key blocks, with a recomputing backward pass.

Forward (Milakov & Gimelshein 2018; Rabe & Staats 2021; Dao et al. 2022). For each query
block Q_i and key blocks K_j, V_j in turn, with running max m, normaliser l and accumulator a:

    S   = Q_i K_j^T / sqrt(d)            (masked entries = -inf)
    m'  = max(m, rowmax S)               (m starts at -inf; a shift of -inf is taken as 0)
    P   = exp(S - m')
    l   = l exp(m - m') + rowsum P
    a   = a exp(m - m') + P V_j
    O_i = a / l          (0 where query i sees no key: zeros, not NaN)

and the log-normaliser L_i = m + log l is kept for the backward pass (+inf where query i
sees no key). Whether a query sees a key is carried as a flag from the masks, not read off
l: a NaN in q or k makes m and l NaN, and that row's output NaN, exactly where "full" is
NaN (a ``l > 0`` test would turn it into a plausible 0). Keys no query may see are zeroed
before the kernel, and a value row with a NaN or Inf entry is zeroed and its key made NaN,
so that only the queries that see it are NaN (the rules of ``ops.masks``); a causal past
row of a diagonal tile never multiplies a future value.

Backward (``jax.custom_vjp``): nothing of size T x S is stored. For each key block j and
query block i the scores are recomputed, P = exp(S - L_i), and with D_i = rowsum(dO_i * O_i):

    dV_j += P^T dO_i,  dP = dO_i V_j^T,  dS = P * (dP - D_i),
    dK_j += dS^T Q_i / sqrt(d),  dQ_i += dS K_j / sqrt(d).

Layout and blocking, chosen by measurement on a 2-core CPU (experiments/bench_exact.py):

- Head-major: the inputs become [B*H, N, D] and every loop step is ONE head's [bq, bk]
  tile (lax.map over heads, loops over blocks inside). A tile of 1024 x 1024 float32 (4 MiB)
  stays in cache through the max / exp / sum passes that follow its matmul; batching all
  heads into one step made an 8-head tile 32 MiB and the forward 1.5x slower.
- The forward uses square blocks (``block_size``, default 1024). The backward loops over key
  blocks of ``block_size`` and, inside, over SMALLER query blocks (``backward_query_block``,
  default 256), on transposed tiles (S^T = K_j Q_i^T, key rows first) so that dV and dK are
  plain matmuls: 1.25x faster than square backward blocks at N = 4096. Each pass pads the
  (unpadded) residuals to its own block multiple, so the two blockings are independent.
- Block sizes are balanced: a length of 1100 with block 1024 becomes 2 blocks of 552, not
  2 blocks of 1024.

Memory is O(N) in both passes (one tile plus O(N d) accumulators). With ``causal``, key
blocks entirely above the diagonal are skipped (loop bounds), not masked; only blocks that
straddle the diagonal carry an element mask, built from absolute positions so that query
and key blocks of different sizes work. Any T and S: padded keys are masked, padded
queries are sliced off (their dO is 0 and their L is +inf, so they add nothing to dK, dV).
Computation is in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.core import check_config
from efficient_attn.ops.masks import hide_keys, poison_keys, split_nonfinite

__all__ = ["blockwise_attention", "balanced_block", "check_softcap", "forward_blocks", "backward_blocks"]


def check_softcap(variant: str, softcap) -> None:
    """A config's soft cap is None or a finite number > 0 (c tanh(s / c) with c <= 0 is no cap)."""
    if softcap is None:
        return
    ok = isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and 0 < float(softcap) < float("inf")
    check_config(variant, ok, f"softcap must be None or a finite number > 0 (e.g. 50.0, Gemma 2's), got {softcap!r}")



def balanced_block(length: int, block: int) -> int:
    """The block size actually used for ``length`` rows: one block if it fits, else
    ceil(length / block) equal blocks, each rounded up to a multiple of 8 where that stays
    within ``block``."""
    n_blocks = -(-length // block)
    if n_blocks == 1:
        return length
    size = -(-length // n_blocks)
    rounded = -(-size // 8) * 8
    return rounded if rounded <= block else size


def _pad_rows(x, rows: int, value=0.0):
    """Pad axis 1 of ``x`` to ``rows``."""
    pad = rows - x.shape[1]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _visible(rows0, cols0, nrows: int, ncols: int, valid_cols, diagonal: bool, transposed: bool,
             seg_rows=None, seg_cols=None):
    """Visibility of one tile (None = all visible): ``valid_cols`` [ncols] bool or None; with
    ``diagonal`` (a causal tile that straddles the diagonal) key position <= query position,
    from the tile's absolute start positions; with ``seg_rows`` [nrows] / ``seg_cols`` [ncols]
    (packed sequences) only pairs of one segment.

    ``transposed``: the tile is [keys, queries] (backward) instead of [queries, keys]; the
    segment ids are then given as (query ids, key ids) all the same.
    """
    vis = None
    if seg_rows is not None:
        same = seg_rows[:, None] == seg_cols[None, :]
        vis = same.T if transposed else same
    if diagonal:
        qpos = rows0 + lax.broadcasted_iota(jnp.int32, (nrows, ncols), 0)
        kpos = cols0 + lax.broadcasted_iota(jnp.int32, (nrows, ncols), 1)
        causal_ok = kpos <= qpos
        if transposed:
            causal_ok = causal_ok.T
        vis = causal_ok if vis is None else jnp.logical_and(vis, causal_ok)
    if valid_cols is not None:
        v = valid_cols[:, None] if transposed else valid_cols[None, :]
        vis = v if vis is None else jnp.logical_and(vis, v)
    return vis


def _finite_shift(m):
    """The running max used as the exp shift: -inf (no visible key yet) becomes 0, so that
    exp(-inf - shift) = 0 and never exp(-inf + inf); NaN and +inf pass through (and poison)."""
    return jnp.where(m == -jnp.inf, 0.0, m)


def _segment_reach(q_seg, k_seg, rows: int, cols: int, nr: int, nc: int):
    """Per query block, the key blocks ``[lo, hi)`` whose segment-id ranges meet its own.

    ``q_seg`` [B, T], ``k_seg`` [B, S] integers; ``rows``/``cols``: block sizes, ``nr``/``nc``
    block counts. A tile whose query ids and key ids span disjoint ranges has no visible pair,
    so it is skipped by the loop bounds. For sorted ids (as packing writes them) the meeting
    blocks are contiguous and this is exactly the set of tiles with a visible pair; unsorted
    ids stay correct (the range between the first and the last meeting block is visited, and
    the in-tile mask decides). Returns lo, hi [B, nr] int32.
    """
    big = jnp.iinfo(jnp.int32).max

    def ranges(seg, size, n):
        L = seg.shape[1]
        real = _pad_rows(jnp.ones(seg.shape, bool), n * size, False).reshape(-1, n, size)
        s = _pad_rows(seg.astype(jnp.int32), n * size).reshape(-1, n, size)
        return jnp.min(jnp.where(real, s, big), -1), jnp.max(jnp.where(real, s, -big), -1)

    qmin, qmax = ranges(q_seg, rows, nr)
    kmin, kmax = ranges(k_seg, cols, nc)
    meet = jnp.logical_and(qmin[:, :, None] <= kmax[:, None, :], kmin[:, None, :] <= qmax[:, :, None])  # [B, nr, nc]
    anyone = jnp.any(meet, -1)
    lo = jnp.argmax(meet, -1).astype(jnp.int32)
    hi = (nc - jnp.argmax(meet[..., ::-1], -1)).astype(jnp.int32)
    return jnp.where(anyone, lo, 0), jnp.where(anyone, hi, 0)


def _kv_head(bh, num_heads: int, group: int):
    """The kv head (row of the [B*Hkv, ...] k and v) that query head row ``bh`` of [B*H, ...] reads:
    batch ``bh // H``, query head ``h = bh % H`` reads kv head ``h // group`` (jax.nn's convention)."""
    return (bh // num_heads) * (num_heads // group) + (bh % num_heads) // group


def forward_blocks(q, k, v, valid, q_seg, k_seg, sinks, num_heads: int, group: int, causal: bool, block: int,
             softcap: float | None):
    """q [B*H, T, D] (pre-scaled), k [B*Hkv, S, D], v [B*Hkv, S, Dv], valid [B, S] | None,
    q_seg [B, T] / k_seg [B, S] | None, sinks [H] | None; H = ``num_heads``, Hkv = H / ``group``.

    Returns out [B*H, T, Dv] and lse [B*H, T].
    """
    BH, T, _ = q.shape
    S, Dv = k.shape[1], v.shape[-1]
    bq, bk = balanced_block(T, block), balanced_block(S, block)
    nq, nk = -(-T // bq), -(-S // bk)
    if nk * bk != S:  # padded keys are masked like kv_mask's False
        valid = jnp.ones((BH // num_heads, S), bool) if valid is None else valid
    if valid is not None:
        valid = _pad_rows(valid, nk * bk, False).reshape(-1, nk, bk)
    segmented = q_seg is not None
    if segmented:
        seg_lo, seg_hi = _segment_reach(q_seg, k_seg, bq, bk, nq, nk)
        qsb = _pad_rows(q_seg.astype(jnp.int32), nq * bq, -1).reshape(-1, nq, bq)
        ksb = _pad_rows(k_seg.astype(jnp.int32), nk * bk, -2).reshape(-1, nk, bk)
    qb = _pad_rows(q, nq * bq).reshape(BH, nq, bq, -1)
    kb = _pad_rows(k, nk * bk).reshape(k.shape[0], nk, bk, -1)
    vb = _pad_rows(v, nk * bk).reshape(v.shape[0], nk, bk, Dv)

    def one_query_block(args):  # one head's query block: (head bh, block i) flattened
        bh, i = args
        b = bh // num_heads
        kvh = _kv_head(bh, num_heads, group)
        q_i, k_h, v_h = qb[bh, i], kb[kvh], vb[kvh]
        valid_h = None if valid is None else valid[b]
        qs_i = qsb[b, i] if segmented else None

        def update(carry, q_rows, k_cols, v_cols, rows0, cols0, valid_cols, diagonal, seg_rows=None, seg_cols=None):
            """One online-softmax step of the rows ``q_rows`` over the keys ``k_cols``."""
            m, l, acc, seen = carry
            s = jnp.dot(q_rows, k_cols.T, preferred_element_type=jnp.float32)
            if softcap is not None:
                s = softcap * jnp.tanh(s / softcap)
            vis = _visible(rows0, cols0, q_rows.shape[0], k_cols.shape[0], valid_cols, diagonal, transposed=False,
                           seg_rows=seg_rows, seg_cols=seg_cols)
            if vis is not None:
                s = jnp.where(vis, s, -jnp.inf)
                seen = jnp.logical_or(seen, jnp.any(vis, axis=-1))
            else:
                seen = jnp.ones_like(seen)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            shift = _finite_shift(m_new)
            p = jnp.exp(s - shift[:, None])
            corr = jnp.exp(m - shift)
            l = l * corr + jnp.sum(p, axis=-1)
            acc = acc * corr[:, None] + jnp.dot(p, v_cols, preferred_element_type=jnp.float32)
            return m_new, l, acc, seen

        def step(j, carry, diagonal):
            return update(carry, q_i, k_h[j], v_h[j], i * bq, j * bk, None if valid_h is None else valid_h[j],
                          diagonal, qs_i, None if qs_i is None else ksb[b, j])

        carry = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
                 jnp.zeros((bq, Dv), jnp.float32), jnp.zeros((bq,), bool))
        if segmented:
            # only the key blocks whose segment ranges meet this block's (8 packed sequences
            # of 1K visit 8 x 1 tiles of 1K, not 8 x 8); causal also stops at the diagonal
            lo, hi = seg_lo[b, i], seg_hi[b, i]
            if causal:
                hi = jnp.minimum(hi, ((i + 1) * bq - 1) // bk + 1)
            m, l, acc, seen = lax.fori_loop(lo, jnp.maximum(lo, hi), functools.partial(step, diagonal=causal), carry)
        elif causal and bq == bk and bq % 16 == 0:
            # square blocks (self-attention): key blocks j < i wholly visible, unmasked; the
            # diagonal tile in two row halves, so its invisible top-right quarter is never
            # computed (the top half sees only the first half of the keys).
            carry = lax.fori_loop(0, i, functools.partial(step, diagonal=False), carry)
            h = bq // 2
            top = tuple(c[:h] for c in carry)
            bottom = tuple(c[h:] for c in carry)
            vi = None if valid_h is None else valid_h[i]
            top = update(top, q_i[:h], k_h[i][:h], v_h[i][:h], i * bq, i * bk, None if vi is None else vi[:h], True)
            bottom = update(bottom, q_i[h:], k_h[i], v_h[i], i * bq + h, i * bk, vi, True)
            m, l, acc, seen = (jnp.concatenate([a, b]) for a, b in zip(top, bottom))
        elif causal:
            # key blocks wholly at or before this block's first query: no mask; then the
            # blocks that straddle the diagonal (masked); later blocks are never visited.
            first_q, last_q = i * bq, (i + 1) * bq - 1
            j_end = jnp.minimum(nk, last_q // bk + 1)
            j_full = jnp.minimum(j_end, (first_q + 1) // bk)
            carry = lax.fori_loop(0, j_full, functools.partial(step, diagonal=False), carry)
            m, l, acc, seen = lax.fori_loop(j_full, j_end, functools.partial(step, diagonal=True), carry)
        else:
            m, l, acc, seen = lax.fori_loop(0, nk, functools.partial(step, diagonal=False), carry)
        shift = _finite_shift(m)
        if sinks is not None:
            # the sink joins the denominator: l' = l e^{m - m'} + e^{sink - m'}, m' = max(m, sink)
            sink = sinks[bh % num_heads]
            top = jnp.maximum(shift, sink)
            corr = jnp.exp(shift - top)
            l = l * corr + jnp.exp(sink - top)
            acc = acc * corr[:, None]
            shift = top
        # seen: from the masks. A NaN l (NaN input) stays NaN; l = 0 with visible keys (all
        # their logits -inf) is 0/0 = NaN, as in "full".
        out = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0)
        lse = jnp.where(seen, shift + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return out, lse

    # one flat loop over (head, query block): 1.4x faster than a loop over heads around a
    # loop over query blocks on the 2-core CPU
    heads = jnp.repeat(jnp.arange(BH), nq)
    blocks = jnp.tile(jnp.arange(nq), BH)
    out, lse = lax.map(one_query_block, (heads, blocks))
    return out.reshape(BH, nq * bq, Dv)[:, :T], lse.reshape(BH, nq * bq)[:, :T]


def backward_blocks(q, k, v, valid, q_seg, k_seg, out, lse, d_out, num_heads: int, group: int, causal: bool,
              block_k: int, block_q: int, softcap: float | None):
    """Gradients of q, k, v (shapes as ``_forward``'s inputs); residuals unpadded.

    The loop runs over kv heads; inside, over the ``group`` query heads that read it, so the
    gradient of a shared key sums over its group without any per-query-head copy of k or v.
    """
    BH, T, D = q.shape
    BHkv = k.shape[0]
    S, Dv = k.shape[1], v.shape[-1]
    G = group
    cq, ck = balanced_block(T, block_q), balanced_block(S, block_k)
    nq, nk = -(-T // cq), -(-S // ck)
    if nk * ck != S:
        valid = jnp.ones((BH // num_heads, S), bool) if valid is None else valid
    if valid is not None:
        valid = _pad_rows(valid, nk * ck, False).reshape(-1, nk, ck)
    segmented = q_seg is not None
    if segmented:
        # per key block, the query blocks whose segment ranges meet it
        seg_lo, seg_hi = _segment_reach(k_seg, q_seg, ck, cq, nk, nq)
        qsb = _pad_rows(q_seg.astype(jnp.int32), nq * cq, -1).reshape(-1, nq, cq)
        ksb = _pad_rows(k_seg.astype(jnp.int32), nk * ck, -2).reshape(-1, nk, ck)
    delta = jnp.sum(d_out * out, axis=-1)  # [BH, T]
    by_kv = lambda x: x.reshape((BHkv, G) + x.shape[1:])  # noqa: E731  [B*H, ...] -> [B*Hkv, G, ...]
    qb = by_kv(_pad_rows(q, nq * cq).reshape(BH, nq, cq, D))
    dob = by_kv(_pad_rows(d_out, nq * cq).reshape(BH, nq, cq, Dv))
    lseb = by_kv(_pad_rows(lse, nq * cq, jnp.inf).reshape(BH, nq, cq))  # padded queries: P = 0
    deltab = by_kv(_pad_rows(delta, nq * cq).reshape(BH, nq, cq))
    kb = _pad_rows(k, nk * ck).reshape(BHkv, nk, ck, D)
    vb = _pad_rows(v, nk * ck).reshape(BHkv, nk, ck, Dv)
    num_kv = num_heads // G

    def one_head(args):  # one kv head and the G query heads that read it
        q_h, do_h, lse_h, delta_h, k_h, v_h, bkv = args
        b = bkv // num_kv
        valid_h = None if valid is None else valid[b]

        def one_key_block(dq, args):
            k_j, v_j, j = args
            valid_j = None if valid_h is None else valid_h[j]
            ks_j = ksb[b, j] if segmented else None

            def step(i, carry, g, diagonal):
                dq, dk, dv = carry
                q_i, do_i = q_h[g, i], do_h[g, i]
                st = jnp.dot(k_j, q_i.T, preferred_element_type=jnp.float32)  # [ck, cq]
                if softcap is not None:
                    t = jnp.tanh(st / softcap)
                    st = softcap * t
                vis = _visible(i * cq, j * ck, cq, ck, valid_j, diagonal, transposed=True,
                               seg_rows=qsb[b, i] if segmented else None, seg_cols=ks_j)
                if vis is not None:
                    st = jnp.where(vis, st, -jnp.inf)
                pt = jnp.exp(st - lse_h[g, i][None, :])
                dv = dv + jnp.dot(pt, do_i, preferred_element_type=jnp.float32)
                dpt = jnp.dot(v_j, do_i.T, preferred_element_type=jnp.float32)
                dst = pt * (dpt - delta_h[g, i][None, :])
                if softcap is not None:  # d(c tanh(s / c)) / ds = 1 - tanh^2
                    dst = dst * (1.0 - t * t)
                dk = dk + jnp.dot(dst, q_i, preferred_element_type=jnp.float32)
                at = (g, i, 0, 0)
                dq_i = lax.dynamic_slice(dq, at, (1, 1, cq, D))[0, 0] + jnp.dot(
                    dst.T, k_j, preferred_element_type=jnp.float32)
                return lax.dynamic_update_slice(dq, dq_i[None, None], at), dk, dv

            def one_query_head(g, carry):
                if segmented:
                    lo, hi = seg_lo[b, j], seg_hi[b, j]
                    if causal:
                        lo = jnp.maximum(lo, (j * ck) // cq)
                    return lax.fori_loop(lo, jnp.maximum(lo, hi), functools.partial(step, g=g, diagonal=causal),
                                         carry)
                if causal:
                    # query blocks that straddle the diagonal (masked), then those wholly after it;
                    # query blocks wholly before this key block are never visited.
                    first_k, last_k = j * ck, (j + 1) * ck - 1
                    i_start = first_k // cq
                    i_full = jnp.minimum(nq, (last_k + cq - 1) // cq)
                    carry = lax.fori_loop(i_start, i_full, functools.partial(step, g=g, diagonal=True), carry)
                    return lax.fori_loop(i_full, nq, functools.partial(step, g=g, diagonal=False), carry)
                return lax.fori_loop(0, nq, functools.partial(step, g=g, diagonal=False), carry)

            carry = (dq, jnp.zeros((ck, D), jnp.float32), jnp.zeros((ck, Dv), jnp.float32))
            if G == 1:
                dq, dk, dv = one_query_head(0, carry)
            else:
                dq, dk, dv = lax.fori_loop(0, G, one_query_head, carry)
            return dq, (dk, dv)

        dq, (dk, dv) = lax.scan(one_key_block, jnp.zeros((G, nq, cq, D), jnp.float32), (k_h, v_h, jnp.arange(nk)))
        return dq, dk, dv

    dq, dk, dv = lax.map(one_head, (qb, dob, lseb, deltab, kb, vb, jnp.arange(BHkv)))
    return (dq.reshape(BH, nq * cq, D)[:, :T], dk.reshape(BHkv, nk * ck, D)[:, :S],
            dv.reshape(BHkv, nk * ck, Dv)[:, :S])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12))
def _head_major_attention(q, k, v, valid, q_seg, k_seg, sinks, num_heads, group, causal, block,
                          backward_query_block, softcap):
    out, _ = forward_blocks(q, k, v, valid, q_seg, k_seg, sinks, num_heads, group, causal, block, softcap)
    return out


def _head_major_fwd(q, k, v, valid, q_seg, k_seg, sinks, num_heads, group, causal, block, backward_query_block,
                    softcap):
    out, lse = forward_blocks(q, k, v, valid, q_seg, k_seg, sinks, num_heads, group, causal, block, softcap)
    return out, (q, k, v, valid, q_seg, k_seg, sinks, out, lse)


def _head_major_bwd(num_heads, group, causal, block, backward_query_block, softcap, res, d_out):
    q, k, v, valid, q_seg, k_seg, sinks, out, lse = res
    d_out = d_out.astype(jnp.float32)
    dq, dk, dv = backward_blocks(q, k, v, valid, q_seg, k_seg, out, lse, d_out, num_heads, group, causal, block,
                           backward_query_block, softcap)
    d_sinks = None
    if sinks is not None:
        # out = sum_j p_j v_j with the sink in the denominator only: d out / d sink = -p_sink out,
        # so d sink = -sum over queries of p_sink (dO . out); lse = +inf (nothing seen) gives 0
        p_sink = jnp.exp(jnp.tile(sinks, q.shape[0] // num_heads)[:, None] - lse)
        delta = jnp.sum(d_out * out, axis=-1)
        d_sinks = -jnp.sum((p_sink * delta).reshape(-1, num_heads, q.shape[1]), axis=(0, 2))
    return dq, dk, dv, None, None, None, d_sinks


_head_major_attention.defvjp(_head_major_fwd, _head_major_bwd)


def blockwise_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S Hkv D"],
    v: Float[Array, "B S Hkv Dv"],
    *,
    causal: bool = False,
    kv_mask: Bool[Array, "B S"] | None = None,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    softcap: float | None = None,
    sinks: Float[Array, "H"] | None = None,
    block_size: int = 1024,
    backward_query_block: int = 256,
) -> Float[Array, "B T H Dv"]:
    """Exact softmax attention in O(N) memory, forward and backward (see module docstring).

    Grouped-query attention: k and v may have Hkv heads, H % Hkv == 0, query head h reading
    kv head h // (H / Hkv); no per-query-head copy of k or v is made, forward or backward.
    ``q_segment_ids`` / ``kv_segment_ids`` (packed sequences; both or neither): a query sees
    only keys of its own segment; tiles whose id ranges cannot meet are skipped.
    ``softcap`` c: logits s -> c tanh(s / c) (after the 1/sqrt(d) scale). ``sinks`` [H]: a
    logit per head that joins every denominator (no value).

    ``block_size``: query and key rows per forward block, key rows per backward block;
    ``backward_query_block``: query rows per backward block. Both are clipped to the
    sequence lengths (and balanced), so short inputs use one block. ``causal`` requires T == S.
    """
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    if causal and T != S:
        raise ValueError(f"blockwise_attention: causal masking needs T == S (self-attention), got T={T}, S={S}; "
                         "pass causal=False for cross attention")
    if H % Hkv or v.shape[2] != Hkv:
        raise ValueError(f"blockwise_attention: q has {H} heads, k {Hkv}, v {v.shape[2]}; k and v need the same "
                         "head count, dividing q's")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("blockwise_attention: give both q_segment_ids and kv_segment_ids, or neither")
    if softcap is not None and not (float(softcap) > 0 and math.isfinite(float(softcap))):
        raise ValueError(f"blockwise_attention: softcap must be a finite number > 0, got {softcap}")
    scale = 1.0 / jnp.sqrt(jnp.float32(D))

    def head_major(x):  # [B, L, heads, E] -> [B*heads, L, E], float32
        return x.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(B * x.shape[2], x.shape[1], x.shape[-1])

    # outside the custom_vjp, so that autodiff gives these where's zero gradients: masked
    # keys are read by no product; a non-finite value poisons (NaN key) only who sees it
    v, bad = split_nonfinite(hide_keys(v.astype(jnp.float32), kv_mask))
    k = hide_keys(poison_keys(k.astype(jnp.float32), bad), kv_mask)
    sinks = None if sinks is None else jnp.asarray(sinks, jnp.float32)
    out = _head_major_attention(head_major(q) * scale, head_major(k), head_major(v), kv_mask, q_segment_ids,
                                kv_segment_ids, sinks, H, H // Hkv, bool(causal), int(block_size),
                                int(backward_query_block), None if softcap is None else float(softcap))
    return out.reshape(B, H, T, Dv).transpose(0, 2, 1, 3)
