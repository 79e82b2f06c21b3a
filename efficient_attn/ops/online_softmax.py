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

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from efficient_attn.ops.masks import hide_keys, poison_keys, split_nonfinite

__all__ = ["blockwise_attention", "balanced_block"]



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


def _visible(rows0, cols0, nrows: int, ncols: int, valid_cols, diagonal: bool, transposed: bool):
    """Visibility of one tile (None = all visible): ``valid_cols`` [ncols] bool or None; with
    ``diagonal`` (a causal tile that straddles the diagonal) key position <= query position,
    from the tile's absolute start positions.

    ``transposed``: the tile is [keys, queries] (backward) instead of [queries, keys].
    """
    vis = None
    if diagonal:
        qpos = rows0 + lax.broadcasted_iota(jnp.int32, (nrows, ncols), 0)
        kpos = cols0 + lax.broadcasted_iota(jnp.int32, (nrows, ncols), 1)
        vis = kpos <= qpos
        if transposed:
            vis = vis.T
    if valid_cols is not None:
        v = valid_cols[:, None] if transposed else valid_cols[None, :]
        vis = v if vis is None else jnp.logical_and(vis, v)
    return vis


def _finite_shift(m):
    """The running max used as the exp shift: -inf (no visible key yet) becomes 0, so that
    exp(-inf - shift) = 0 and never exp(-inf + inf); NaN and +inf pass through (and poison)."""
    return jnp.where(m == -jnp.inf, 0.0, m)


def _forward(q, k, v, valid, num_heads: int, causal: bool, block: int):
    """q [BH, T, D] (pre-scaled), k [BH, S, D], v [BH, S, Dv], valid [B, S] | None.

    Returns out [BH, T, Dv] and lse [BH, T].
    """
    BH, T, _ = q.shape
    S, Dv = k.shape[1], v.shape[-1]
    bq, bk = balanced_block(T, block), balanced_block(S, block)
    nq, nk = -(-T // bq), -(-S // bk)
    if nk * bk != S:  # padded keys are masked like kv_mask's False
        valid = jnp.ones((BH // num_heads, S), bool) if valid is None else valid
    if valid is not None:
        valid = _pad_rows(valid, nk * bk, False).reshape(-1, nk, bk)
    qb = _pad_rows(q, nq * bq).reshape(BH, nq, bq, -1)
    kb = _pad_rows(k, nk * bk).reshape(BH, nk, bk, -1)
    vb = _pad_rows(v, nk * bk).reshape(BH, nk, bk, Dv)

    def one_query_block(args):  # one head's query block: (head bh, block i) flattened
        bh, i = args
        q_i, k_h, v_h = qb[bh, i], kb[bh], vb[bh]
        valid_h = None if valid is None else valid[bh // num_heads]

        def update(carry, q_rows, k_cols, v_cols, rows0, cols0, valid_cols, diagonal):
            """One online-softmax step of the rows ``q_rows`` over the keys ``k_cols``."""
            m, l, acc, seen = carry
            s = jnp.dot(q_rows, k_cols.T, preferred_element_type=jnp.float32)
            vis = _visible(rows0, cols0, q_rows.shape[0], k_cols.shape[0], valid_cols, diagonal, transposed=False)
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
                          diagonal)

        carry = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
                 jnp.zeros((bq, Dv), jnp.float32), jnp.zeros((bq,), bool))
        if causal and bq == bk and bq % 16 == 0:
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
        # seen: from the masks. A NaN l (NaN input) stays NaN; l = 0 with visible keys (all
        # their logits -inf) is 0/0 = NaN, as in "full".
        out = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0)
        lse = jnp.where(seen, _finite_shift(m) + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return out, lse

    # one flat loop over (head, query block): 1.4x faster than a loop over heads around a
    # loop over query blocks on the 2-core CPU
    heads = jnp.repeat(jnp.arange(BH), nq)
    blocks = jnp.tile(jnp.arange(nq), BH)
    out, lse = lax.map(one_query_block, (heads, blocks))
    return out.reshape(BH, nq * bq, Dv)[:, :T], lse.reshape(BH, nq * bq)[:, :T]


def _backward(q, k, v, valid, out, lse, d_out, num_heads: int, causal: bool, block_k: int, block_q: int):
    """Gradients of q, k, v (shapes as ``_forward``'s inputs); residuals unpadded."""
    BH, T, D = q.shape
    S, Dv = k.shape[1], v.shape[-1]
    cq, ck = balanced_block(T, block_q), balanced_block(S, block_k)
    nq, nk = -(-T // cq), -(-S // ck)
    if nk * ck != S:
        valid = jnp.ones((BH // num_heads, S), bool) if valid is None else valid
    if valid is not None:
        valid = _pad_rows(valid, nk * ck, False).reshape(-1, nk, ck)
    delta = jnp.sum(d_out * out, axis=-1)  # [BH, T]
    qb = _pad_rows(q, nq * cq).reshape(BH, nq, cq, D)
    dob = _pad_rows(d_out, nq * cq).reshape(BH, nq, cq, Dv)
    lseb = _pad_rows(lse, nq * cq, jnp.inf).reshape(BH, nq, cq)  # padded queries: P = 0
    deltab = _pad_rows(delta, nq * cq).reshape(BH, nq, cq)
    kb = _pad_rows(k, nk * ck).reshape(BH, nk, ck, D)
    vb = _pad_rows(v, nk * ck).reshape(BH, nk, ck, Dv)

    def one_head(args):
        q_h, do_h, lse_h, delta_h, k_h, v_h, bh = args
        valid_h = None if valid is None else valid[bh // num_heads]

        def one_key_block(dq, args):
            k_j, v_j, j = args
            valid_j = None if valid_h is None else valid_h[j]

            def step(i, carry, diagonal):
                dq, dk, dv = carry
                q_i, do_i = q_h[i], do_h[i]
                st = jnp.dot(k_j, q_i.T, preferred_element_type=jnp.float32)  # [ck, cq]
                vis = _visible(i * cq, j * ck, cq, ck, valid_j, diagonal, transposed=True)
                if vis is not None:
                    st = jnp.where(vis, st, -jnp.inf)
                pt = jnp.exp(st - lse_h[i][None, :])
                dv = dv + jnp.dot(pt, do_i, preferred_element_type=jnp.float32)
                dpt = jnp.dot(v_j, do_i.T, preferred_element_type=jnp.float32)
                dst = pt * (dpt - delta_h[i][None, :])
                dk = dk + jnp.dot(dst, q_i, preferred_element_type=jnp.float32)
                dq_i = lax.dynamic_index_in_dim(dq, i, keepdims=False) + jnp.dot(
                    dst.T, k_j, preferred_element_type=jnp.float32)
                return lax.dynamic_update_index_in_dim(dq, dq_i, i, axis=0), dk, dv

            carry = (dq, jnp.zeros((ck, D), jnp.float32), jnp.zeros((ck, Dv), jnp.float32))
            if causal:
                # query blocks that straddle the diagonal (masked), then those wholly after it;
                # query blocks wholly before this key block are never visited.
                first_k, last_k = j * ck, (j + 1) * ck - 1
                i_start = first_k // cq
                i_full = jnp.minimum(nq, (last_k + cq - 1) // cq)
                carry = lax.fori_loop(i_start, i_full, functools.partial(step, diagonal=True), carry)
                dq, dk, dv = lax.fori_loop(i_full, nq, functools.partial(step, diagonal=False), carry)
            else:
                dq, dk, dv = lax.fori_loop(0, nq, functools.partial(step, diagonal=False), carry)
            return dq, (dk, dv)

        dq, (dk, dv) = lax.scan(one_key_block, jnp.zeros((nq, cq, D), jnp.float32), (k_h, v_h, jnp.arange(nk)))
        return dq, dk, dv

    dq, dk, dv = lax.map(one_head, (qb, dob, lseb, deltab, kb, vb, jnp.arange(BH)))
    return (dq.reshape(BH, nq * cq, D)[:, :T], dk.reshape(BH, nk * ck, D)[:, :S],
            dv.reshape(BH, nk * ck, Dv)[:, :S])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _head_major_attention(q, k, v, valid, num_heads, causal, block, backward_query_block):
    out, _ = _forward(q, k, v, valid, num_heads, causal, block)
    return out


def _head_major_fwd(q, k, v, valid, num_heads, causal, block, backward_query_block):
    out, lse = _forward(q, k, v, valid, num_heads, causal, block)
    return out, (q, k, v, valid, out, lse)


def _head_major_bwd(num_heads, causal, block, backward_query_block, res, d_out):
    q, k, v, valid, out, lse = res
    dq, dk, dv = _backward(q, k, v, valid, out, lse, d_out.astype(jnp.float32), num_heads, causal, block,
                           backward_query_block)
    return dq, dk, dv, None


_head_major_attention.defvjp(_head_major_fwd, _head_major_bwd)


def blockwise_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S H D"],
    v: Float[Array, "B S H Dv"],
    *,
    causal: bool = False,
    kv_mask: Bool[Array, "B S"] | None = None,
    block_size: int = 1024,
    backward_query_block: int = 256,
) -> Float[Array, "B T H Dv"]:
    """Exact softmax attention in O(N) memory, forward and backward (see module docstring).

    ``block_size``: query and key rows per forward block, key rows per backward block;
    ``backward_query_block``: query rows per backward block. Both are clipped to the
    sequence lengths (and balanced), so short inputs use one block. ``causal`` requires T == S.
    """
    B, T, H, D = q.shape
    S = k.shape[1]
    Dv = v.shape[-1]
    if causal and T != S:
        raise ValueError(f"blockwise_attention: causal masking needs T == S (self-attention), got T={T}, S={S}; "
                         "pass causal=False for cross attention")
    scale = 1.0 / jnp.sqrt(jnp.float32(D))

    def head_major(x):  # [B, L, H, E] -> [B*H, L, E], float32
        return x.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(B * H, x.shape[1], x.shape[-1])

    # outside the custom_vjp, so that autodiff gives these where's zero gradients: masked
    # keys are read by no product; a non-finite value poisons (NaN key) only who sees it
    v, bad = split_nonfinite(hide_keys(v.astype(jnp.float32), kv_mask))
    k = hide_keys(poison_keys(k.astype(jnp.float32), bad), kv_mask)
    out = _head_major_attention(head_major(q) * scale, head_major(k), head_major(v), kv_mask, H, bool(causal),
                                int(block_size), int(backward_query_block))
    return out.reshape(B, H, T, Dv).transpose(0, 2, 1, 3)
