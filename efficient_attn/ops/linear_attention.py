"""Linear attention from feature maps: the engine of ``linear``, ``performer`` and ``cosformer``.

Given feature maps phi(Q) [B, T, H, F] and phi(K) [B, S, Hkv, F] (computed by the variant),

    out_i = sum_j (phi(q_i) . phi(k_j)) v_j  /  sum_j phi(q_i) . phi(k_j)

over the keys j visible to query i, never forming the T x S matrix:

non-causal (reassociation, Katharopoulos et al. 2020):
    KV = phi(K)^T V  [F, Dv],  z = sum_j phi(k_j)  [F]
    num_i = phi(q_i) KV,  den_i = phi(q_i) . z   time O(N F Dv), memory O(N (F + Dv) + F Dv)

causal (chunk-parallel; the form of fla / GLA, Yang et al. 2024): the sequence is cut into
chunks of C positions (padded to a multiple of C with zero features, which contribute
nothing). Within a chunk the C x C scores phi(Q_c) phi(K_c)^T are masked to j <= i and applied
quadratically; across chunks a prefix state  S = sum over earlier chunks of phi(K)^T [V | 1]
is carried by ``lax.scan`` over the N / C chunks (not over tokens):

    [num | den]_c = tril(phi(Q_c) phi(K_c)^T) [V_c | 1]  +  phi(Q_c) S,    S += phi(K_c)^T [V_c | 1]

time O(N C F + N F Dv), memory O(N C + (N / C) F Dv) with the scan's saved states (linear in N).

Masks. ``kv_mask``: a masked key's features (and value) are replaced by zeros with ``where``
(not a product, so a NaN or inf there cannot leak), so it adds nothing to the numerator or
the denominator. A query that sees nothing has den == 0 and gets exactly zero output. (The
variant must also keep a masked key out of its feature map's gradient: zero the raw key
with ``where`` before computing phi, as ``variants/kernel.py`` does.) Causal: the in-chunk
scores are masked with ``where`` AFTER every product that could hold a future NaN or Inf
(a future key's features times its weight), so past rows never read a future value.

Non-finite inputs (the rules of ``ops.masks``): a value row with a NaN or Inf entry is
zeroed and its key's features made NaN, so the queries that see it (causal: the later ones)
are NaN, the others unchanged; a NaN in a query's or a visible key's features makes the
rows that see it NaN, never zeros (see ``normalise``).

Numerics (safe in bfloat16): features and values are cast to float32 before any product
and every sum (states, scores, num, den) is accumulated in float32. The denominator is the
numerator's contraction with an all-ones column in place of V: packed, the same matmul with
that extra column; causal, the same masked scores and carried state times the ones column
(matrix-vector products beside the numerator's matmuls); bidirectional, the key sum z (a
65th column made the matmuls up to 2x slower on CPU). The output is

    out = num / (den + eps)  where den > 1e-30,   0 where den <= 1e-30,   NaN where den is NaN,

i.e. ``eps`` (0 allowed) only stabilises tiny positive denominators; a zero, negative or
underflowing one (nothing visible, pure cancellation noise when features can be negative as
in cosformer, or FAVOR+ products that underflow at huge logits) gives 0 instead of an inf
or a sign flip, unless num is not finite (then NaN). Gradients (a custom VJP, so reverse mode
only): d num = g / (den + eps), d den = -(g . out) / (den + eps); the backward never forms
1 / den^2, which underflows den^2 to 0 (and dq to inf) for a den below 1e-19, as FAVOR+ gives
at logits near 1000; the 1e-30 floor keeps 1 / den finite. A NaN denominator (a NaN input
reached the row) stays NaN: it is never read as "nothing visible"; rows that are not divided
get zero gradients.

Optional per-key log scales (``k_log_scale``, used by FAVOR+). The true key feature is
phi(k_j) * exp(l_j); phi(k_j) is O(1) and l_j may be large (exp(l_j) would overflow or
underflow float32). Since multiplying every key's features by one constant leaves the ratio
unchanged, the engine rescales by exp(l_j - M) with M the largest visible l (``M`` under
``stop_gradient``: the output does not depend on it): non-causal, M = max_j l_j over real
keys; causal, M_i = max over the keys j <= i, tracked like an online softmax: the carried
state is kept at the scale of the running max of earlier chunks and rescaled when a chunk
raises it, and within a chunk row i uses the cumulative max up to i. Every exponent is then
<= 0, and output i depends only on keys j <= i, bit for bit.

Grouped-query heads (GQA). phi(K), V and the log scales may have Hkv < H heads (H a multiple
of Hkv): query head h reads kv head h // (H / Hkv). The queries are viewed as [.., Hkv, G, F]
(G = H / Hkv) and every state phi(K)^T [V | 1] is built once per kv head and read by its G
query heads; k and v are never repeated per query head, so the state memory is that of Hkv
heads and the gradient of a shared key sums over its group by construction.

Packed sequences (``q_segment_ids`` / ``kv_segment_ids``): a query sees only keys of its own
segment. The engine works on a layout where every segment is one contiguous run of tokens:

    aligned (self-attention, T == S and equal ids: what packing writes): tokens sorted by id,
        stable, so a segment's tokens keep their order (sorted ids, the usual case, are left
        where they are);
    merged (cross attention, or different query and key ids): the T queries and S keys are
        put in ONE sequence of T + S elements sorted by (id, position, key-before-query), the
        queries carrying no key features and the keys no query features.

(A call with T == S chooses between the two with ``lax.cond`` on whether the ids are equal,
unless both ids are the same array.) On that layout, chunk-parallel, never a loop over segments:

    in a chunk, the C x C scores are masked to pairs of one segment (and j <= i when causal);
    a carry from the left, entering chunk c, is the sum phi(K)^T [V | 1] of the run that holds
    the last token before the chunk (it is kept across the boundary only where that run goes
    on, i.e. reset at each segment start); a query adds it when it belongs to that run;
    bidirectional, a carry from the right (a reverse scan) does the same for the run that
    holds the first token after the chunk.

Cost O(L C F + L F Dv) time and O(L C + (L / C) F Dv) memory for L = T (aligned) or T + S
(merged), plus an O(L log L) sort of the ids: linear in the tokens, independent of the
number of segments. Log scales are maximised over a query's own segment only (the row's
constant never comes from another sequence), so a packed row equals the sequence alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.ops.masks import split_nonfinite
from efficient_attn.ops.permute import inverse_permutation, take_rows

__all__ = ["linear_attention", "normalise", "causal_chunked", "NEG"]

NEG = -1e30  # "no key yet" log scale: finite, so differences of two of them are 0, not NaN
_TINY_DEN = 1e-30  # denominators at or below this are underflow: 1 / den must stay finite in float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def normalise(num: Float[Array, "... Dv"], den: Float[Array, "... 1"], eps: float) -> Float[Array, "... Dv"]:
    """``num / (den + eps)`` where ``den > 1e-30``; 0 where ``den <= 1e-30`` (NaN if ``num`` is
    not finite there); NaN where ``den`` is NaN. Finite forward and backward for finite inputs.

    The backward is written out: d num = g / (den + eps) and d den = -(g . out) / (den + eps),
    both O(1 / den) (never 1 / den^2, which underflows den^2 to 0 for den below 1e-19, as FAVOR+
    gives at huge logits), and zero on the rows that are not divided (den <= 1e-30 or NaN)."""
    return _normalise_fwd(num, den, eps)[0]


def _normalise_fwd(num, den, eps: float):
    pos = den > _TINY_DEN
    inv = 1.0 / jnp.where(pos, den + eps, 1.0)
    rest = jnp.where(jnp.isnan(den), jnp.nan, 0.0 * num)  # 0 * num: 0, or NaN for a non-finite num
    out = jnp.where(pos, num * inv, rest)
    return out, (pos, inv, out)


def _normalise_bwd(eps: float, res, g):
    pos, inv, out = res
    d_num = jnp.where(pos, g * inv, 0.0)
    d_den = jnp.where(pos, -inv * jnp.sum(g * out, axis=-1, keepdims=True), 0.0)
    return d_num, jnp.broadcast_to(d_den, pos.shape)


normalise.defvjp(_normalise_fwd, _normalise_bwd)


def _pad_len(x, axis: int, size: int, value=0.0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _chunker(N: int, chunk: int):
    """(C, n, chunks): ``chunks(x)`` cuts [B, N, K, ...] into [n, B, K, C, ...] (padded to n C)."""
    C = min(chunk, N)
    n = -(-N // C)

    def chunks(x, value=0.0):
        x = _pad_len(x, 1, n * C, value)
        x = x.reshape((x.shape[0], n, C) + x.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)

    return C, n, chunks


def _unchunk(out, N: int):
    """[n, B, K, C, G, E] -> [B, N, K, G, E]."""
    n, B, K, C = out.shape[:4]
    out = jnp.moveaxis(jnp.moveaxis(out, 3, 2), 0, 1).reshape((B, n * C, K) + out.shape[4:])
    return out[:, :N]


# Shapes inside: q [B, T, K, G, F] (K = kv heads, G query heads per kv head), k [B, S, K, F],
# v1 [B, S, K, E] (values with the all-ones column), l [B, S, K] or None.


@jax.custom_vjp
def _reassociated(qh: Float[Array, "B K G T F"], kh: Float[Array, "B K S F"], vh: Float[Array, "B K S Dv"]):
    """num = phi(Q) (phi(K)^T V) and den = phi(Q) sum_j phi(k_j), head-major. The backward is
    written out so that every gradient comes out of its matmul in the layout of its input
    ([.., S, F], not [.., F, S]): autodiff's operand order made XLA transpose dk and dv back
    element by element, a third of the forward+backward time at N = 16K."""
    return _reassociated_fwd(qh, kh, vh)[0]


def _reassociated_fwd(qh, kh, vh):
    kv = jnp.einsum("bksf,bkse->bkfe", kh, vh)  # one state per kv head
    k_sum = jnp.sum(kh, axis=2)  # [B, K, F]
    num = jnp.einsum("bkgtf,bkfe->bkgte", qh, kv)
    den = jnp.einsum("bkgtf,bkf->bkgt", qh, k_sum)
    return (num, den), (qh, kh, vh, kv, k_sum)


def _reassociated_bwd(res, cotangents):
    qh, kh, vh, kv, k_sum = res
    d_num, d_den = cotangents
    d_q = jnp.einsum("bkgte,bkfe->bkgtf", d_num, kv) + d_den[..., None] * k_sum[:, :, None, None, :]
    d_kv = jnp.einsum("bkgtf,bkgte->bkfe", qh, d_num)
    d_sum = jnp.einsum("bkgtf,bkgt->bkf", qh, d_den)
    d_k = jnp.einsum("bkse,bkfe->bksf", vh, d_kv) + d_sum[:, :, None, :]
    d_v = jnp.einsum("bksf,bkfe->bkse", kh, d_kv)
    return d_q, d_k, d_v


_reassociated.defvjp(_reassociated_fwd, _reassociated_bwd)


def _noncausal(q, k, v, log_scale, eps: float):
    """Bidirectional: one state phi(K)^T V and one key sum per kv head, read by every query.

    Head-major inside ([B, K, S, F], [B, K, G, T, F]) and the denominator apart from the
    numerator (q . sum_j phi(k_j), not an all-ones column of V): the two products are then
    plain matmuls of the shapes the CPU kernels are fast at (a 65th column made them up to 2x
    slower), and the output is transposed back once, after the division. Returns the
    normalised output [B, T, K, G, Dv] and the denominator [B, T, K, G]."""
    if log_scale is not None:
        top = lax.stop_gradient(jnp.max(log_scale, axis=1, keepdims=True))  # [B, 1, K]
        k = k * jnp.exp(log_scale - top)[..., None]
    kh, vh = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)  # [B, K, S, F], [B, K, S, Dv]
    num, den = _reassociated(jnp.transpose(q, (0, 2, 3, 1, 4)), kh, vh)  # q: [B, K, G, T, F]
    out = normalise(num, den[..., None], eps)
    return jnp.transpose(out, (0, 3, 1, 2, 4)), jnp.transpose(den, (0, 3, 1, 2))


def causal_chunked(q: Float[Array, "B N K G F"], k: Float[Array, "B N K F"], v1: Float[Array, "B N K E"],
                   log_scale: Float[Array, "B N K"] | None, chunk: int) -> Float[Array, "B N K G E"]:
    """The causal sums sum_{j<=i} (phi(q_i) . phi(k_j)) [v_j, 1] by chunks of ``chunk`` tokens
    from a zero state (intra-chunk products under a triangular mask, the running state
    between chunks); ``log_scale`` (per key, optional) weights each key by exp(log_scale),
    carried at a running maximum so that no exponent overflows. The context-parallel form
    (``parallel.context_linear``) calls it for each device's shard before adding the carries.

    The last column of ``v1`` (the denominator's, all ones for normalised attention) is
    contracted by matrix-vector products beside the matmuls of the others: a 65th column made
    every matmul of the step up to 2x slower on CPU, for 1/65 of the work."""
    B, N, K, G, F = q.shape
    E = v1.shape[-1]
    C, _, chunks = _chunker(N, chunk)
    qc, kc, vc = chunks(q), chunks(k), chunks(v1)  # [n, B, K, C, G, F], [n, B, K, C, F], [n, B, K, C, E]
    vc, wc = vc[..., :-1], vc[..., -1]  # [n, B, K, C, E - 1], [n, B, K, C]
    tri = jnp.tril(jnp.ones((C, C), bool))
    if log_scale is None:

        def step(carry, xs):
            state, z = carry  # [B, K, F, E - 1], [B, K, F]
            q, k, v, w = xs
            s = jnp.where(tri, jnp.einsum("bkigf,bkjf->bkgij", q, k), 0.0)  # future NaN: where, after the product
            out = jnp.einsum("bkgij,bkje->bkige", s, v) + jnp.einsum("bkigf,bkfe->bkige", q, state)
            den = jnp.einsum("bkgij,bkj->bkig", s, w) + jnp.einsum("bkigf,bkf->bkig", q, z)
            carry = (state + jnp.einsum("bkjf,bkje->bkfe", k, v), z + jnp.einsum("bkjf,bkj->bkf", k, w))
            return carry, (out, den)

        init = (jnp.zeros((B, K, F, E - 1), jnp.float32), jnp.zeros((B, K, F), jnp.float32))
        _, (out, den) = lax.scan(step, init, (qc, kc, vc, wc))
    else:
        lc = chunks(log_scale, NEG)  # [n, B, K, C]

        def step(carry, xs):
            state, z, top = carry  # state and z at scale exp(-top); top [B, K]
            q, k, v, w, l = xs
            ls = lax.stop_gradient(l)
            row_top = jnp.maximum(top[..., None], lax.cummax(ls, axis=2))  # [B, K, C]
            # exponent l_j - row_top_i <= 0 for j <= i; masked before exp (no inf, no NaN grad)
            decay = jnp.exp(jnp.where(tri, l[..., None, :] - row_top[..., :, None], NEG))
            # where after the product
            s = jnp.where(tri, jnp.einsum("bkigf,bkjf->bkgij", q, k) * decay[:, :, None], 0.0)
            old = jnp.exp(top[..., None] - row_top)  # [B, K, C]: the carried state's scale for row i
            inter = jnp.einsum("bkigf,bkfe->bkige", q, state) * old[..., None, None]
            out = jnp.einsum("bkgij,bkje->bkige", s, v) + inter
            den = jnp.einsum("bkgij,bkj->bkig", s, w) + jnp.einsum("bkigf,bkf->bkig", q, z) * old[..., None]
            new_top = jnp.maximum(top, jnp.max(ls, axis=2))
            kw = k * jnp.exp(l - new_top[..., None])[..., None]
            rescale = jnp.exp(top - new_top)
            state = state * rescale[..., None, None] + jnp.einsum("bkjf,bkje->bkfe", kw, v)
            z = z * rescale[..., None] + jnp.einsum("bkjf,bkj->bkf", kw, w)
            return (state, z, new_top), (out, den)

        init = (jnp.zeros((B, K, F, E - 1), jnp.float32), jnp.zeros((B, K, F), jnp.float32),
                jnp.full((B, K), NEG, jnp.float32))
        _, (out, den) = lax.scan(step, init, (qc, kc, vc, wc, lc))
    return _unchunk(jnp.concatenate([out, den[..., None]], axis=-1), N)


# ------------------------------------------------------------------------- packed segments


def _run_carries(kc, vc, lc, idc, reverse: bool):
    """The carry entering each chunk from the left (or, ``reverse``, from the right): the sum
    exp(l - top) phi(k) [v | 1]^T over the run of the token just outside the chunk, its top
    and that run's id. Runs are contiguous, so a run that goes on through a chunk covers it."""
    _, B, K, C, F = kc.shape
    E = vc.shape[-1]
    edge = 0 if reverse else C - 1  # the chunk's token that the next carry continues from

    def step(carry, xs):
        state, top, run = carry  # [B, K, F, E], [B, K], [B]
        k, v, ids, *l = xs  # l: [] or [log scales]
        last = ids[:, edge]
        cont = (last == run)[:, None]  # the run goes on through the whole chunk
        keep = ids == last[:, None]  # [B, C]: the chunk's tokens of the new run
        kk = jnp.where(keep[:, None, :, None], k, 0.0)  # other runs' keys (even NaN ones) never enter
        if not l:
            state = jnp.where(cont[..., None, None], state, 0.0) + jnp.einsum("bkjf,bkje->bkfe", kk, v)
        else:
            ls = lax.stop_gradient(l[0])
            new_top = jnp.maximum(jnp.where(cont, top, NEG), jnp.max(jnp.where(keep[:, None], ls, NEG), axis=2))
            old = jnp.exp(jnp.where(cont, top - new_top, 0.0))[..., None, None]
            w = jnp.exp(jnp.where(keep[:, None], l[0] - new_top[..., None], NEG))  # exponents <= 0
            kept = jnp.where(cont[..., None, None], state * old, 0.0)
            state = kept + jnp.einsum("bkjf,bkje->bkfe", kk * w[..., None], v)
            top = new_top
        return (state, top, last), (state, top, last)

    init = (jnp.zeros((B, K, F, E), jnp.float32), jnp.full((B, K), NEG, jnp.float32), idc[0, :, 0])
    xs = (kc, vc, idc) if lc is None else (kc, vc, idc, lc)
    _, (after_state, after_top, after_run) = lax.scan(step, init, xs, reverse=reverse)

    # entering chunk c = the carry after chunk c - 1 (left) or c + 1 (right); nothing at the ends
    def shift(x, first):
        return jnp.concatenate([x[1:], first[None]]) if reverse else jnp.concatenate([first[None], x[:-1]])

    return shift(after_state, init[0]), shift(after_top, init[1]), shift(after_run, init[2])


def _contiguous(q, k, v1, log_scale, ids, causal: bool, chunk: int):
    """Attention within segments on a layout where each id is ONE contiguous run (module docstring)."""
    B, N, K, G, F = q.shape
    C, _, chunks = _chunker(N, chunk)
    ids = _pad_len(ids, 1, -(-N // C) * C, 0)
    ids = jnp.where(jnp.arange(ids.shape[1]) < N, ids, ids[:, N - 1 : N])  # padding extends the last run
    qc, kc, vc = chunks(q), chunks(k), chunks(v1)
    idc = jnp.moveaxis(ids.reshape(B, -1, C), 1, 0)  # [n, B, C]
    lc = None if log_scale is None else chunks(log_scale, NEG)  # [n, B, K, C]
    sides = [_run_carries(kc, vc, lc, idc, reverse=False)]
    if not causal:
        sides.append(_run_carries(kc, vc, lc, idc, reverse=True))
    same = idc[..., :, None] == idc[..., None, :]  # [n, B, C, C]
    if causal:
        same = same & jnp.tril(jnp.ones((C, C), bool))
    reads = [idc == run[..., None] for _, _, run in sides]  # [n, B, C]: the query belongs to that run
    scores = jnp.einsum("nbkigf,nbkjf->nbkgij", qc, kc)
    if lc is None:
        s = jnp.where(same[:, :, None, None], scores, 0.0)  # where after the product
        out = jnp.einsum("nbkgij,nbkje->nbkige", s, vc)
        for (state, _, _), read in zip(sides, reads):
            inter = jnp.einsum("nbkigf,nbkfe->nbkige", qc, state)
            out = out + jnp.where(read[:, :, None, :, None, None], inter, 0.0)
        return _unchunk(out, N)
    ls = lax.stop_gradient(lc)
    # the row's constant: the largest log scale among the keys of ITS segment only
    row_top = jnp.max(jnp.where(same[:, :, None], ls[..., None, :], NEG), axis=-1)  # [n, B, K, C]
    for (_, top, _), read in zip(sides, reads):
        row_top = jnp.maximum(row_top, jnp.where(read[:, :, None], top[..., None], NEG))
    w = jnp.exp(jnp.where(same[:, :, None], lc[..., None, :] - row_top[..., :, None], NEG))  # exponents <= 0
    s = jnp.where(same[:, :, None, None], scores * w[:, :, :, None], 0.0)
    out = jnp.einsum("nbkgij,nbkje->nbkige", s, vc)
    for (state, top, _), read in zip(sides, reads):
        r = read[:, :, None]  # [n, B, 1, C]
        scale = jnp.exp(jnp.where(r, top[..., None] - row_top, NEG))[..., None, None]
        inter = jnp.einsum("nbkigf,nbkfe->nbkige", qc, state) * scale
        out = out + jnp.where(r[..., None, None], inter, 0.0)
    return _unchunk(out, N)


def _aligned(q, k, v1, log_scale, ids, causal: bool, chunk: int):
    """Self-attention with equal query and key ids: tokens stably sorted by id, attended, put back."""
    order = jnp.argsort(ids, axis=1, stable=True)
    back = inverse_permutation(order)
    sort = lambda x: take_rows(x, order)  # noqa: E731
    ls = None if log_scale is None else sort(log_scale)
    out = _contiguous(sort(q), sort(k), sort(v1), ls, sort(ids), causal, chunk)
    return take_rows(out, back)


def _merged(q, k, v1, log_scale, q_ids, kv_ids, causal: bool, chunk: int):
    """Any ids: queries and keys in one sequence sorted by (id, position, key first), attended, taken back."""
    B, T = q.shape[:2]
    S = k.shape[1]
    zq = jnp.concatenate([q, jnp.zeros((B, S) + q.shape[2:], q.dtype)], axis=1)
    zk = jnp.concatenate([jnp.zeros((B, T) + k.shape[2:], k.dtype), k], axis=1)
    zv = jnp.concatenate([jnp.zeros((B, T) + v1.shape[2:], v1.dtype), v1], axis=1)
    zl = None
    if log_scale is not None:
        zl = jnp.concatenate([jnp.full((B, T) + log_scale.shape[2:], NEG, log_scale.dtype), log_scale], axis=1)
    ids = jnp.concatenate([q_ids, kv_ids], axis=1)
    position = jnp.broadcast_to(jnp.concatenate([jnp.arange(T), jnp.arange(S)]), ids.shape)
    is_query = jnp.broadcast_to(jnp.concatenate([jnp.ones(T, jnp.int32), jnp.zeros(S, jnp.int32)]), ids.shape)
    order = jnp.lexsort((is_query, position, ids), axis=1)  # ids first; a key before the query of its position
    back = inverse_permutation(order)
    sort = lambda x: take_rows(x, order)  # noqa: E731
    zl = None if zl is None else sort(zl)
    out = _contiguous(sort(zq), sort(zk), sort(zv), zl, sort(ids), causal, chunk)
    return take_rows(out, back)[:, :T]


def _packed(q, k, v1, log_scale, q_ids, kv_ids, causal: bool, chunk: int):
    if q_ids is kv_ids:
        return _aligned(q, k, v1, log_scale, q_ids, causal, chunk)
    if q.shape[1] != k.shape[1]:
        return _merged(q, k, v1, log_scale, q_ids, kv_ids, causal, chunk)
    return lax.cond(
        jnp.all(q_ids == kv_ids),
        lambda ops: _aligned(*ops[:4], ops[4], causal, chunk),
        lambda ops: _merged(*ops, causal, chunk),
        (q, k, v1, log_scale, q_ids, kv_ids),
    )


def linear_attention(
    phi_q: Float[Array, "B T H F"],
    phi_k: Float[Array, "B S Hkv F"],
    v: Float[Array, "B S Hkv Dv"],
    *,
    causal: bool = False,
    kv_mask: Bool[Array, "B S"] | None = None,
    k_log_scale: Float[Array, "B S Hkv"] | None = None,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    eps: float = 0.0,
    chunk_size: int = 64,
    return_denominator: bool = False,
) -> Float[Array, "B T H Dv"] | tuple[Float[Array, "B T H Dv"], Float[Array, "B T H"]]:
    """Normalised linear attention of feature maps; float32 output (see the module docstring).

    ``causal`` needs T == S. ``k_log_scale``: optional per-key log multiplier of phi(k); the
    denominator is then known only up to the engine's rescaling, so ``eps`` must be 0.
    phi(K), v (and the log scales) may have Hkv heads dividing H (grouped-query attention:
    query head h reads kv head h // (H / Hkv)). ``q_segment_ids`` / ``kv_segment_ids``
    (both or neither): packed sequences, a query sees only keys of its own segment.
    ``return_denominator``: also return each query's denominator sum_j phi(q_i) . phi(k_j)
    (from the same pass as the numerator), for a caller that merges this output with another
    normalised part; only without ``k_log_scale`` (whose denominator is rescaled).
    """
    if return_denominator and k_log_scale is not None:
        raise ValueError("linear_attention: return_denominator needs k_log_scale=None (the rescaled denominator "
                         "has no fixed scale)")
    B, T, H, F = phi_q.shape
    S, Hkv = phi_k.shape[1], phi_k.shape[2]
    if causal and T != S:
        raise ValueError(f"causal linear attention needs T == S, got {T} and {S}")
    if k_log_scale is not None and eps != 0:
        raise ValueError("linear_attention: eps must be 0 with k_log_scale (the rescaled denominator has no fixed scale)")
    if v.shape[2] != Hkv or H % Hkv:
        raise ValueError(
            f"linear_attention: phi_k and v must have the same kv head count dividing the {H} query heads, "
            f"got phi_k {tuple(phi_k.shape)} and v {tuple(v.shape)}"
        )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("linear_attention: give both q_segment_ids and kv_segment_ids, or neither")
    phi_q, phi_k, v = (x.astype(jnp.float32) for x in (phi_q, phi_k, v))
    if k_log_scale is not None:
        k_log_scale = k_log_scale.astype(jnp.float32)
    v, bad = split_nonfinite(v)  # a bad value poisons (NaN features) exactly who sees its key
    phi_k = jnp.where(bad[..., None], jnp.nan, phi_k)
    if kv_mask is not None:
        keep = kv_mask[:, :, None]
        phi_k = jnp.where(keep[..., None], phi_k, 0.0)
        v = jnp.where(keep[..., None], v, 0.0)
        if k_log_scale is not None:
            k_log_scale = jnp.where(keep, k_log_scale, NEG)
    q = phi_q.reshape(B, T, Hkv, H // Hkv, F)  # query head h = kv head h // G, member h % G
    if q_segment_ids is None and not causal:
        out, den = _noncausal(q, phi_k, v, k_log_scale, eps)
        out, den = out.reshape(B, T, H, -1), den.reshape(B, T, H)
        return (out, den) if return_denominator else out
    v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
    if q_segment_ids is not None:
        nd = _packed(q, phi_k, v1, k_log_scale, q_segment_ids, kv_segment_ids, bool(causal), chunk_size)
    else:
        nd = causal_chunked(q, phi_k, v1, k_log_scale, chunk_size)
    nd = nd.reshape(B, T, H, -1)
    out = normalise(nd[..., :-1], nd[..., -1:], eps)
    return (out, nd[..., -1]) if return_denominator else out
