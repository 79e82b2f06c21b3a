"""KV caches for decoding softmax attention: every past key, or a ring buffer of a window.

Decoding computes one query at a time. For softmax attention the token at position p needs

    out_p = sum_{j in N(p)} softmax_j(q_p . k_j / sqrt(d)) v_j

over the keys it may see, N(p) a subset of 0..p, so the keys and values of the past are kept:

``KVCache``   slots 0..L-1 hold the keys and values of positions 0..L-1 (L = the state's
              max_len) and ``valid`` says which hold a real key (not yet written, or a padded
              prompt token, is False). Memory O(L d) per head, read O(p d) per step.
``RingBuffer`` W slots; position p lives in slot p mod W, so after writing p the slots hold
              the last W positions, p - W + 1 .. p. ``pos`` records which position each slot
              holds (-1: never written). A sliding window of w keys behind the query needs
              W = w + 1 slots: memory independent of the context length.

Reads (float32, one masked softmax; the rules of ``ops.masks``: a slot nobody may see is
never read by a product, a query that sees nothing gets zeros, a value with a NaN or Inf
entry makes the logits of its key NaN so that exactly who sees it is NaN):

``attend_dense``   one masked softmax over all slots given a visibility [B|1, H|1, L]
                   (``attend_dense_lse`` also returns the log-normaliser, to merge parts;
                   ``attend_logits`` takes logits that are not q . k)
``attend_blocks``  the same over a ``KVCache`` by an online softmax over blocks of slots
                   (FlashAttention's recurrence for one query): blocks past the position are
                   skipped (``lax.cond``), so a step reads O(p) slots however large L is, and
                   no [L] logit vector exists beyond one block.

Grouped-query attention: the cache holds Hkv heads; query head h reads kv head h // (H / Hkv).
Writes zero a padded token's key and value (``where``), so whatever they held cannot leak.
The readable reference of both reads is ``ops.reference.softmax.softmax_attention`` over the
cache with the same visibility (tests/ops/test_kv_cache.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.ops.masks import masked_softmax, split_nonfinite

__all__ = [
    "KVCache",
    "RingBuffer",
    "init_cache",
    "init_softmax_cache",
    "write",
    "causal_visible",
    "attend_dense",
    "attend_dense_lse",
    "attend_logits",
    "attend_blocks",
    "init_ring",
    "ring_fill",
    "ring_push",
    "ring_slot",
]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "valid"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k ``[B, L, Hkv, D]``, v ``[B, L, Hkv, Dv]`` (the cache dtype), valid ``[B, L]`` bool."""

    k: Float[Array, "B L Hkv D"]
    v: Float[Array, "B L Hkv Dv"]
    valid: Bool[Array, "B L"]


def init_cache(batch: int, length: int, heads: int, head_dim: int, value_dim: int, dtype) -> KVCache:
    """An empty cache of ``length`` slots (nothing valid)."""
    return KVCache(
        k=jnp.zeros((batch, length, heads, head_dim), dtype),
        v=jnp.zeros((batch, length, heads, value_dim), dtype),
        valid=jnp.zeros((batch, length), bool),
    )


def init_softmax_cache(variant: str, batch: int, length: int, kv_heads: int, head_dim: int, dtype, *,
                       softcap: float | None, sinks: bool) -> KVCache:
    """The empty KV cache of a softmax-family variant's decoding, refused (ValueError naming
    the fix) when the variant was built with a soft cap or sinks: the cache's readers
    (``attend_dense``, ``attend_blocks``) implement neither."""
    if softcap is not None or sinks:
        raise ValueError(f"{variant}: decoding with softcap or sinks is not implemented; build without them to decode")
    return init_cache(batch, length, kv_heads, head_dim, head_dim, dtype)


def _real(x, keep):
    return x if keep is None else jnp.where(keep[:, :, None, None], x, jnp.zeros((), x.dtype))


def write(
    cache: KVCache,
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv Dv"],
    start: Int[Array, ""] | int,
    kv_mask: Bool[Array, "B T"] | None = None,
    *,
    enabled: Bool[Array, ""] | None = None,
) -> KVCache:
    """Slots ``start .. start + T - 1`` set to k, v (padded tokens: zeros, not valid).

    ``start`` may be traced; like ``lax.dynamic_update_slice`` a start past ``L - T`` is
    clamped to it (the base class makes such a step's output NaN). ``enabled`` (traced bool):
    write only when True (a select over the whole cache: for small caches)."""
    B, T = k.shape[:2]
    real = jnp.ones((B, T), bool) if kv_mask is None else kv_mask
    k, v = _real(k, real).astype(cache.k.dtype), _real(v, real).astype(cache.v.dtype)
    start = jnp.asarray(start, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    new = KVCache(
        k=lax.dynamic_update_slice(cache.k, k, (zero, start, zero, zero)),
        v=lax.dynamic_update_slice(cache.v, v, (zero, start, zero, zero)),
        valid=lax.dynamic_update_slice(cache.valid, real, (zero, start)),
    )
    if enabled is None:
        return new
    return jax.tree.map(lambda a, b: jnp.where(enabled, a, b), new, cache)


def causal_visible(cache: KVCache, position: Int[Array, ""]) -> Bool[Array, "B 1 L"]:
    """Slots a query at ``position`` sees under causal attention: written, real, <= position."""
    L = cache.valid.shape[1]
    return (cache.valid & (jnp.arange(L) <= position)[None])[:, None, :]


def _grouped(q_t: Float[Array, "B H D"], kv_heads: int) -> Float[Array, "B Hkv G D"]:
    B, H, D = q_t.shape
    return q_t.astype(jnp.float32).reshape(B, kv_heads, H // kv_heads, D)


def _read(
    logits: Float[Array, "B Hkv G L"], v: Float[Array, "B L Hkv Dv"], vis: Bool[Array, "B Hkv G L"]
) -> tuple[Float[Array, "B Hkv G Dv"], Float[Array, "B Hkv G"]]:
    """Masked softmax over the slots and the weighted values; (out, lse), lse = -inf (and out
    = 0) where nothing is visible. A slot nobody sees never enters a product."""
    used = jnp.any(vis, axis=2).transpose(0, 2, 1)[..., None]  # [B, L, Hkv, 1]
    vf, bad = split_nonfinite(jnp.where(used, v.astype(jnp.float32), 0.0))
    logits = jnp.where(bad.transpose(0, 2, 1)[:, :, None, :], jnp.nan, logits)  # who sees a bad value is NaN
    weights = masked_softmax(logits, vis)
    top = lax.stop_gradient(jnp.max(jnp.where(vis, logits, -jnp.inf), axis=-1))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    den = jnp.sum(jnp.where(vis, jnp.exp(jnp.where(vis, logits - top[..., None], 0.0)), 0.0), axis=-1)
    seen = jnp.any(vis, axis=-1)
    lse = jnp.where(seen, top + jnp.log(jnp.where(seen, den, 1.0)), -jnp.inf)
    return jnp.einsum("bkgl,blke->bkge", weights, vf), lse


def _visibility(visible, B: int, H: int, Hkv: int, L: int) -> Bool[Array, "B Hkv G L"]:
    return jnp.broadcast_to(visible, (B, H, L)).reshape(B, Hkv, H // Hkv, L)


def attend_dense_lse(
    q_t: Float[Array, "B H D"],
    k: Float[Array, "B L Hkv D"],
    v: Float[Array, "B L Hkv Dv"],
    visible: Bool[Array, "B|1 H|1 L"],
    *,
    scale: float | None = None,
) -> tuple[Float[Array, "B H Dv"], Float[Array, "B H"]]:
    """softmax(q k^T scale) v over the visible slots and its log-normaliser; float32."""
    B, H, D = q_t.shape
    L, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    vis = _visibility(visible, B, H, Hkv, L)
    used = jnp.any(vis, axis=2).transpose(0, 2, 1)[..., None]
    kf = jnp.where(used, k.astype(jnp.float32), 0.0)
    logits = jnp.einsum("bkgd,blkd->bkgl", _grouped(q_t, Hkv), kf) * scale
    out, lse = _read(logits, v, vis)
    return out.reshape(B, H, v.shape[3]), lse.reshape(B, H)


def attend_dense(
    q_t: Float[Array, "B H D"],
    k: Float[Array, "B L Hkv D"],
    v: Float[Array, "B L Hkv Dv"],
    visible: Bool[Array, "B|1 H|1 L"],
    *,
    scale: float | None = None,
) -> Float[Array, "B H Dv"]:
    """softmax(q k^T scale) v over the visible slots, one query per (batch, head); float32."""
    return attend_dense_lse(q_t, k, v, visible, scale=scale)[0]


def attend_logits(
    logits: Float[Array, "B H L"], v: Float[Array, "B L Hkv Dv"], visible: Bool[Array, "B|1 H|1 L"]
) -> Float[Array, "B H Dv"]:
    """softmax(logits) v over the visible slots, for logits that are not q . k (synthesised)."""
    B, H, L = logits.shape
    Hkv = v.shape[2]
    vis = _visibility(visible, B, H, Hkv, L)
    out, _ = _read(logits.astype(jnp.float32).reshape(B, Hkv, H // Hkv, L), v, vis)
    return out.reshape(B, H, v.shape[3])


def attend_blocks(
    q_t: Float[Array, "B H D"],
    cache: KVCache,
    position: Int[Array, ""],
    *,
    block: int,
    scale: float | None = None,
) -> Float[Array, "B H Dv"]:
    """Causal softmax attention of the query at ``position`` over ``cache``, block by block.

    Running max m, normaliser l and numerator o over the blocks 0 .. position // block:

        m' = max(m, max_j s_j),   l' = l e^(m - m') + sum_j e^(s_j - m'),
        o' = o e^(m - m') + sum_j e^(s_j - m') v_j,          out = o / l   (0 when l = 0)

    with s_j over the block's visible slots (real, <= position). The last block may overlap
    the previous one (a slice is clamped inside the cache); slots counted before are masked.
    A query that saw no slot gets 0 (known from the masks; a NaN l stays NaN).
    """
    B, H, D = q_t.shape
    L, Hkv, Dv = cache.k.shape[1], cache.k.shape[2], cache.v.shape[3]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    b = max(1, min(block, L))
    n = -(-L // b)
    qg = _grouped(q_t, Hkv) * scale
    neg = jnp.finfo(jnp.float32).min

    def read(carry, i):
        m, l, o, seen = carry
        first = i * b
        start = jnp.minimum(first, L - b)
        idx = start + jnp.arange(b)
        zero = jnp.zeros((), jnp.int32)
        kb = lax.dynamic_slice(cache.k, (zero, start, zero, zero), (B, b, Hkv, D)).astype(jnp.float32)
        vb = lax.dynamic_slice(cache.v, (zero, start, zero, zero), (B, b, Hkv, Dv)).astype(jnp.float32)
        ok = lax.dynamic_slice(cache.valid, (zero, start), (B, b)) & (idx >= first) & (idx <= position)  # [B, b]
        kb = jnp.where(ok[:, :, None, None], kb, 0.0)
        vb, bad = split_nonfinite(jnp.where(ok[:, :, None, None], vb, 0.0))
        s = jnp.einsum("bkgd,bjkd->bkgj", qg, kb)
        s = jnp.where(bad.transpose(0, 2, 1)[:, :, None, :], jnp.nan, s)
        vis = ok[:, None, None, :]
        m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, neg), axis=-1))
        e = jnp.where(vis, jnp.exp(jnp.where(vis, s - m_new[..., None], 0.0)), 0.0)
        alpha = jnp.exp(m - m_new)
        l_new = l * alpha + jnp.sum(e, axis=-1)
        o_new = o * alpha[..., None] + jnp.einsum("bkgj,bjke->bkge", e, vb)
        return (m_new, l_new, o_new, seen | jnp.any(ok, axis=1)[:, None, None])

    def body(carry, i):
        return lax.cond(i * b <= position, read, lambda c, _: c, carry, i), None

    init = (
        jnp.full((B, Hkv, G), neg, jnp.float32),
        jnp.zeros((B, Hkv, G), jnp.float32),
        jnp.zeros((B, Hkv, G, Dv), jnp.float32),
        jnp.zeros((B, Hkv, G), bool),
    )
    (_, l, o, seen), _ = lax.scan(body, init, jnp.arange(n, dtype=jnp.int32))
    # "saw nothing" is read from the masks, not from l (a NaN l is not "nothing visible")
    out = jnp.where(seen[..., None], o / jnp.where(seen, l, 1.0)[..., None], 0.0)
    return out.reshape(B, H, Dv)


# ------------------------------------------------------------------------------ ring buffer


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "valid", "pos"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class RingBuffer:
    """W slots: k ``[B, W, Hkv, D]``, v ``[B, W, Hkv, Dv]``, valid ``[B, W]`` (a real key),
    pos ``[W]`` int32 (the position a slot holds, the same for every row; -1 = never written)."""

    k: Float[Array, "B W Hkv D"]
    v: Float[Array, "B W Hkv Dv"]
    valid: Bool[Array, "B W"]
    pos: Int[Array, " W"]

    @property
    def slots(self) -> int:
        return self.pos.shape[0]


def init_ring(batch: int, slots: int, heads: int, head_dim: int, value_dim: int, dtype) -> RingBuffer:
    """An empty ring of ``slots`` slots."""
    c = init_cache(batch, slots, heads, head_dim, value_dim, dtype)
    return RingBuffer(k=c.k, v=c.v, valid=c.valid, pos=jnp.full((slots,), -1, jnp.int32))


def ring_fill(
    ring: RingBuffer, k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv Dv"],
    kv_mask: Bool[Array, "B T"] | None = None,
) -> RingBuffer:
    """An empty ring after the positions 0..T-1: the last min(T, W) of them, each in slot p mod W."""
    B, T = k.shape[:2]
    W = ring.slots
    real = jnp.ones((B, T), bool) if kv_mask is None else kv_mask
    keep = min(T, W)
    positions = jnp.arange(T - keep, T, dtype=jnp.int32)
    slot = positions % W
    k, v = _real(k, real)[:, T - keep:], _real(v, real)[:, T - keep:]
    return RingBuffer(
        k=ring.k.at[:, slot].set(k.astype(ring.k.dtype)),
        v=ring.v.at[:, slot].set(v.astype(ring.v.dtype)),
        valid=ring.valid.at[:, slot].set(real[:, T - keep:]),
        pos=ring.pos.at[slot].set(positions),
    )


def ring_slot(ring: RingBuffer, position: Int[Array, ""]):
    """(k [B, Hkv, D], v [B, Hkv, Dv], live [B], held position) of slot ``position mod W``:
    the entry that pushing ``position`` overwrites (live: written and real)."""
    s = position % ring.slots
    held = ring.pos[s]
    return ring.k[:, s], ring.v[:, s], ring.valid[:, s] & (held >= 0), held


def ring_push(
    ring: RingBuffer, k_t: Float[Array, "B Hkv D"], v_t: Float[Array, "B Hkv Dv"], position: Int[Array, ""]
) -> RingBuffer:
    """The ring after the (real) token at ``position``: slot ``position mod W`` overwritten."""
    s = position % ring.slots
    return RingBuffer(
        k=ring.k.at[:, s].set(k_t.astype(ring.k.dtype)),
        v=ring.v.at[:, s].set(v_t.astype(ring.v.dtype)),
        valid=ring.valid.at[:, s].set(True),
        pos=ring.pos.at[s].set(position.astype(jnp.int32)),
    )
