"""Ring attention: exact softmax attention with the sequence split over a mesh axis.

Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context" (arXiv 2310.01889). Each of the P devices along the axis holds n = T / P queries and
m = S / P keys and values. The key/value blocks travel around the ring (``lax.ppermute``,
device i sends to i + 1): at step s device i holds the block of device i - s (mod P) and
merges its partial attention into a running result by the log-sum-exp rule of the online
softmax (Milakov & Gimelshein 2018). With O_s, L_s the normalised output and log-normaliser
of one block (``ops.online_softmax``'s kernel; L = +inf where the block shows the query no
key):

    L   = logaddexp(L_a, L_b)
    O   = O_a exp(L_a - L) + O_b exp(L_b - L)           (0 where neither block shows a key)

After P steps every query has met every key: the result equals one-device attention.

Backward (``jax.custom_vjp``, nothing of size n x m stored): with the final O and L and
D_i = rowsum(dO_i * O_i), each block's gradient needs only its own scores, recomputed:
P = exp(S - L), dV_j = P^T dO, dS = P * (dO V_j^T - D), dK_j = dS^T Q, dQ += dS K_j (the
kernel's ``backward_blocks``, per block). The key/value blocks go round the ring again, and the
accumulators dK_j, dV_j travel with their block; after P - 1 steps one more hop brings each
accumulator home to the device that owns the block.

Communication per device: forward (P - 1) hops of its k and v block (and the key mask);
backward (P - 1) hops of k, v, dk, dv plus the last hop of dk, dv (``ring_communication_bytes``,
checked against the program by ``mesh.collective_bytes`` in the tests). Memory per device is
O(n + m) plus one kernel tile: about 1/P of one device's.

Causal load balance: zigzag placement. With the sequence cut into 2P chunks of c = T / (2P),
device i holds chunks i and 2P - 1 - i (in that order, so its local sequence is sorted by
position). Then, with contiguous placement's imbalance gone (there device 0 would use 1 of
its P blocks and device P - 1 all of them):

    step 0 (its own block)       causal attention on its 2c positions (local causal mask)
    step s >= 1, source j = i - s mod P:
      j < i  (s <= i)  "lower":  all 2c queries x the first c keys (chunk j), no mask
      j > i            "upper":  the last c queries (chunk 2P-1-i) x all 2c keys, no mask

and every other (query, key) pair of the step is invisible. Each device hands the kernel
2c x c score entries at every step >= 1 and one local causal problem at step 0: the same
work on every device at every step (``ring_plan`` / ``ring_work``; tests check the plan
against the visibility of global positions and that the work is equal). Striped placement
(Brandon et al. 2023, "Striped Attention: Faster Ring Attention for Causal Transformers",
arXiv 2311.09431: position p on device p mod P) balances too, but needs a strictly-lower
causal mask for half the steps, which the shared kernel does not have; zigzag reuses the
kernel's own causal and unmasked paths as they are.

``ring_attention`` takes q, k, v in natural order and, when causal, gathers them into zigzag
order before the ring and back after it (a permutation of the sequence axis: XLA moves the
chunks between devices). A model that keeps its activations in zigzag order end to end
passes ``zigzag_input=True`` and pays nothing for it.

What experiments need to know: the result is exact (equal to "full" / "blockwise" to float32
rounding, forward and backward, tests at P = 2, 4, 8); T and S must be multiples of P (causal:
of 2P) -- pad and mask with ``kv_mask`` otherwise; key padding (``kv_mask``), packed segments
(the ids travel with their keys), grouped-query heads (the ring carries Hkv heads) and a
logit soft cap are supported; dense masks and attention sinks are not; compute is float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.core import Attention, Capabilities, Dims, Mask, check_config, check_positive_int
from efficient_attn.ops.masks import hide_keys, poison_keys, split_nonfinite
from efficient_attn.ops.online_softmax import backward_blocks, forward_blocks
from efficient_attn.parallel.mesh import axis_size, check_divisible

__all__ = [
    "ring_attention",
    "RingConfig",
    "RingAttention",
    "placement",
    "zigzag_order",
    "takes_lower",
    "ring_plan",
    "ring_work",
    "visible_pairs",
    "ring_communication_bytes",
]


# --------------------------------------------------------------------------- the placement


def placement(length: int, devices: int, scheme: str = "zigzag") -> np.ndarray:
    """``[P, length / P]``: the global positions device i holds, in its local order.

    ``"contiguous"``: device i holds positions [i n, (i + 1) n); ``"zigzag"``: chunks i and
    2P - 1 - i of 2P equal chunks (``length`` a multiple of 2P)."""
    if scheme == "contiguous":
        return np.arange(length).reshape(devices, length // devices)
    if scheme != "zigzag":
        raise ValueError(f"placement: scheme must be 'contiguous' or 'zigzag', got {scheme!r}")
    chunks = np.arange(length).reshape(2 * devices, length // (2 * devices))
    return np.stack([np.concatenate([chunks[i], chunks[2 * devices - 1 - i]]) for i in range(devices)])


def zigzag_order(length: int, devices: int) -> np.ndarray:
    """The permutation that puts a sequence in zigzag order: ``x[:, zigzag_order(T, P)]``
    cut into P contiguous shards gives each device its two chunks."""
    return placement(length, devices, "zigzag").reshape(-1)


def takes_lower(step, device):
    """The zigzag plan at step >= 1: whether ``device`` meets an earlier device's block
    (source = device - step mod P < device), i.e. the "lower" case. Ints or traced values."""
    return step <= device


def _half_slices(lower: bool, n: int) -> tuple[slice, slice]:
    """(query rows, key rows) of the local block a zigzag step >= 1 computes (module docstring)."""
    c = n // 2
    return (slice(0, n), slice(0, c)) if lower else (slice(c, n), slice(0, n))


def ring_plan(devices: int, local_len: int, causal: bool) -> list[list[tuple[slice, slice, bool]]]:
    """``plan[i][s]`` = (query rows, key rows, local causal mask) that device i hands the
    kernel at step s, when it holds the block of device i - s (mod P). The ring itself
    computes exactly this (the same ``takes_lower`` and slices)."""
    full = (slice(0, local_len), slice(0, local_len), False)
    plan = []
    for i in range(devices):
        row = []
        for s in range(devices):
            if not causal:
                row.append(full)
            elif s == 0:
                row.append((slice(0, local_len), slice(0, local_len), True))
            else:
                row.append(_half_slices(bool(takes_lower(s, i)), local_len) + (False,))
        plan.append(row)
    return plan


def _pairs(q_rows: slice, k_rows: slice, local_causal: bool, n: int) -> int:
    a = np.arange(n)[q_rows][:, None]
    b = np.arange(n)[k_rows][None, :]
    return int(np.sum(b <= a)) if local_causal else int(a.size * b.size)


def ring_work(devices: int, local_len: int, causal: bool) -> np.ndarray:
    """``[P, P]``: the (query, key) score entries device i computes at step s under
    ``ring_plan`` (a local causal block counts its visible entries: the kernel skips the rest)."""
    plan = ring_plan(devices, local_len, causal)
    return np.array([[_pairs(*plan[i][s], local_len) for s in range(devices)] for i in range(devices)])


def visible_pairs(positions: np.ndarray, device: int, step: int, causal: bool) -> np.ndarray:
    """``[n, n]`` bool: which (local query, local key) pairs are visible when ``device``
    holds the block of ``device - step`` (mod P), from the global ``positions`` of
    ``placement`` (causal: key position <= query position)."""
    P = positions.shape[0]
    qpos = positions[device][:, None]
    kpos = positions[(device - step) % P][None, :]
    return kpos <= qpos if causal else np.ones((qpos.size, kpos.size), bool)


def ring_communication_bytes(batch: int, local_len: int, kv_heads: int, head_dim: int, value_dim: int,
                             devices: int, *, kv_mask: bool, segments: bool = False,
                             itemsize: int = 4) -> dict[str, int]:
    """Bytes one device sends along the ring: ``forward`` (its k, v block with its key mask and
    segment ids, P - 1 hops) and ``backward`` (k, v, mask, ids, dk, dv for P - 1 hops, then dk,
    dv home). k and v are float32 (``itemsize``) whatever the input dtype, with the kv heads
    (grouped-query attention sends Hkv, not H); a mask entry is one byte, an id four."""
    kv = batch * local_len * kv_heads * (head_dim + value_dim) * itemsize
    mask = batch * local_len * ((1 if kv_mask else 0) + (4 if segments else 0))
    hops = devices - 1
    return {"forward": hops * (kv + mask), "backward": hops * (2 * kv + mask) + (kv if devices > 1 else 0)}


# ------------------------------------------------------------------------- the ring itself


def _shift(tree, axis: str, devices: int):
    """Every device sends ``tree`` to the next one along ``axis`` (i -> i + 1 mod P)."""
    perm = [(i, (i + 1) % devices) for i in range(devices)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis, perm), tree)


def _merge(o_a, lse_a, o_b, lse_b):
    """Two normalised partial attentions over disjoint keys, merged (L = +inf: no key seen).
    A NaN log-normaliser (a NaN input reached the row) stays NaN."""
    seen_a, seen_b = lse_a != jnp.inf, lse_b != jnp.inf
    a = jnp.where(seen_a, lse_a, -jnp.inf)
    b = jnp.where(seen_b, lse_b, -jnp.inf)
    top = jnp.maximum(a, b)
    shift = jnp.where(top == -jnp.inf, 0.0, top)
    wa, wb = jnp.exp(a - shift), jnp.exp(b - shift)
    seen = jnp.logical_or(seen_a, seen_b)
    total = jnp.where(seen, wa + wb, 1.0)
    o = jnp.where(seen[..., None], (o_a * wa[..., None] + o_b * wb[..., None]) / total[..., None], 0.0)
    return o, jnp.where(seen, shift + jnp.log(total), jnp.inf)


def _cut(x, rows: slice):
    return None if x is None else x[:, rows]


def _pad_front(x, rows: int, value):
    pad = jnp.full(x.shape[:1] + (rows,) + x.shape[2:], value, x.dtype)
    return jnp.concatenate([pad, x], axis=1)


def _pad_back(x, rows: int):
    return jnp.concatenate([x, jnp.zeros(x.shape[:1] + (rows,) + x.shape[2:], x.dtype)], axis=1)


def _ring_forward(q, k, v, valid, q_seg, k_seg, axis, devices, heads, group, causal, block, softcap):
    """Per device: q [b H, n, D] (pre-scaled), k [b Hkv, m, D], v [b Hkv, m, Dv], valid [b, m],
    q_seg [b, n], k_seg [b, m] (each may be None). Returns the merged out [b H, n, Dv] and
    log-normaliser [b H, n]. The key block (k, v, valid, k_seg) travels; q and q_seg stay."""
    n = q.shape[1]

    def attend(rows, k_, v_, valid_, k_seg_, local_causal):
        return forward_blocks(q[:, rows], k_, v_, valid_, _cut(q_seg, rows), k_seg_, None, heads, group, local_causal,
                        block, softcap)

    def lower(k_s, v_s, valid_s, k_seg_s):
        rows, cols = _half_slices(True, n)
        return attend(rows, k_s[:, cols], v_s[:, cols], _cut(valid_s, cols), _cut(k_seg_s, cols), False)

    def upper(k_s, v_s, valid_s, k_seg_s):
        rows, cols = _half_slices(False, n)
        o, lse = attend(rows, k_s[:, cols], v_s[:, cols], _cut(valid_s, cols), _cut(k_seg_s, cols), False)
        return _pad_front(o, rows.start, 0.0), _pad_front(lse, rows.start, jnp.inf)

    everything = slice(0, n)
    o, lse = attend(everything, k, v, valid, k_seg, causal)
    if devices == 1:
        return o, lse
    me = lax.axis_index(axis)

    def step(s, carry):
        o, lse, kv = carry
        kv = _shift(kv, axis, devices)
        if causal:
            o_s, lse_s = lax.cond(takes_lower(s, me), lower, upper, *kv)
        else:
            o_s, lse_s = attend(everything, *kv, False)
        o, lse = _merge(o, lse, o_s, lse_s)
        return o, lse, kv

    o, lse, _ = lax.fori_loop(1, devices, step, (o, lse, (k, v, valid, k_seg)))
    return o, lse


def _ring_backward(q, k, v, valid, q_seg, k_seg, o, lse, d_o, axis, devices, heads, group, causal, block, block_q,
                   softcap):
    """Per device: gradients of q, k, v for the ring's output, dk and dv brought home."""
    n = q.shape[1]

    def grads(rows, k_, v_, valid_, k_seg_, local_causal):
        return backward_blocks(q[:, rows], k_, v_, valid_, _cut(q_seg, rows), k_seg_, o[:, rows], lse[:, rows],
                         d_o[:, rows], heads, group, local_causal, block, block_q, softcap)

    def lower(k_s, v_s, valid_s, k_seg_s):
        rows, cols = _half_slices(True, n)
        dq, dk, dv = grads(rows, k_s[:, cols], v_s[:, cols], _cut(valid_s, cols), _cut(k_seg_s, cols), False)
        return dq, _pad_back(dk, n - cols.stop), _pad_back(dv, n - cols.stop)

    def upper(k_s, v_s, valid_s, k_seg_s):
        rows, cols = _half_slices(False, n)
        dq, dk, dv = grads(rows, k_s[:, cols], v_s[:, cols], _cut(valid_s, cols), _cut(k_seg_s, cols), False)
        return _pad_front(dq, rows.start, 0.0), dk, dv

    everything = slice(0, n)
    dq, dk, dv = grads(everything, k, v, valid, k_seg, causal)
    if devices == 1:
        return dq, dk, dv
    me = lax.axis_index(axis)

    def step(s, carry):
        dq, kv, dkv = carry
        kv, dkv = _shift((kv, dkv), axis, devices)
        if causal:
            dq_s, dk_s, dv_s = lax.cond(takes_lower(s, me), lower, upper, *kv)
        else:
            dq_s, dk_s, dv_s = grads(everything, *kv, False)
        return dq + dq_s, kv, (dkv[0] + dk_s, dkv[1] + dv_s)

    dq, _, dkv = lax.fori_loop(1, devices, step, (dq, (k, v, valid, k_seg), (dk, dv)))
    dk, dv = _shift(dkv, axis, devices)  # the accumulators of the block held last go home
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11, 12, 13))
def _ring(q, k, v, valid, q_seg, k_seg, axis, devices, heads, group, causal, block, block_q, softcap):
    return _ring_forward(q, k, v, valid, q_seg, k_seg, axis, devices, heads, group, causal, block, softcap)[0]


def _ring_fwd(q, k, v, valid, q_seg, k_seg, axis, devices, heads, group, causal, block, block_q, softcap):
    o, lse = _ring_forward(q, k, v, valid, q_seg, k_seg, axis, devices, heads, group, causal, block, softcap)
    return o, (q, k, v, valid, q_seg, k_seg, o, lse)


def _ring_bwd(axis, devices, heads, group, causal, block, block_q, softcap, res, d_o):
    q, k, v, valid, q_seg, k_seg, o, lse = res
    dq, dk, dv = _ring_backward(q, k, v, valid, q_seg, k_seg, o, lse, d_o.astype(jnp.float32), axis, devices, heads,
                                group, causal, block, block_q, softcap)
    return dq, dk, dv, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _ring_shard(q, k, v, kv_mask, q_seg, k_seg, *, axis, devices, causal, block, block_q, softcap):
    """One device's part: its q [b, n, H, D], k, v [b, m, Hkv, .], key mask [b, m] and
    segment ids [b, n] / [b, m] (each may be None)."""
    B, n, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    # the kernel's input rules (ops.masks), outside the custom_vjp so that their where's get
    # zero gradients: masked keys are read by no product, a non-finite value poisons its key
    v, bad = split_nonfinite(hide_keys(v.astype(jnp.float32), kv_mask))
    k = hide_keys(poison_keys(k.astype(jnp.float32), bad), kv_mask)

    def head_major(x):  # [b, L, heads, E] -> [b heads, L, E]
        return x.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(B * x.shape[2], x.shape[1], x.shape[-1])

    scale = 1.0 / jnp.sqrt(jnp.float32(D))
    out = _ring(head_major(q) * scale, head_major(k), head_major(v), kv_mask, q_seg, k_seg, axis, devices, H,
                H // Hkv, causal, block, block_q, softcap)
    return out.reshape(B, H, n, Dv).transpose(0, 2, 1, 3)


def ring_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S Hkv D"],
    v: Float[Array, "B S Hkv Dv"],
    *,
    mesh: Mesh,
    axis: str = "seq",
    batch_axis: str | None = None,
    causal: bool = False,
    kv_mask: Bool[Array, "B S"] | None = None,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    softcap: float | None = None,
    block_size: int = 1024,
    backward_query_block: int = 256,
    zigzag_input: bool = False,
) -> Float[Array, "B T H Dv"]:
    """Exact softmax attention with T and S split over mesh axis ``axis`` (module docstring).

    ``batch_axis``: a mesh axis that splits the batch too (e.g. ``"data"``), or None (the
    batch is replicated over the other axes). ``causal`` needs T == S, a multiple of 2P;
    otherwise T and S must be multiples of P. Grouped-query k, v (Hkv heads dividing H),
    packed segments (both id arrays or neither) and ``softcap`` are the kernel's
    (``ops.online_softmax.blockwise_attention``); attention sinks are not supported.
    ``zigzag_input``: q, k, v, the mask and the ids are already in ``zigzag_order`` (causal
    only; the output is then in that order too). Block sizes are the kernel's, per device.
    Returns float32.
    """
    who = "ring_attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{who}: {name} must be [B, T|S, heads, D], got shape {getattr(x, 'shape', None)}")
    B, T, H, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or v.shape[0] != B or v.shape[1] != S:
        raise ValueError(f"{who}: q {q.shape}, k {k.shape}, v {v.shape} disagree on batch or length")
    if H % Hkv or v.shape[2] != Hkv:
        raise ValueError(f"{who}: q has {H} heads, k {Hkv}, v {v.shape[2]}; k and v need the same head count, "
                         "dividing q's (grouped-query attention)")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{who}: q and k widths differ: {q.shape[3]} and {k.shape[3]}")
    if not isinstance(causal, bool):
        raise TypeError(f"{who}: causal must be a Python bool, got {type(causal).__name__}")
    if causal and T != S:
        raise ValueError(f"{who}: causal masking needs T == S (self-attention), got T={T}, S={S}")
    if zigzag_input and not causal:
        raise ValueError(f"{who}: zigzag_input applies to causal attention only "
                         "(non-causal rings use the natural order)")
    if kv_mask is not None and (tuple(kv_mask.shape) != (B, S) or kv_mask.dtype != jnp.bool_):
        raise ValueError(f"{who}: kv_mask must be bool [B, S] = [{B}, {S}], got {kv_mask.dtype} {tuple(kv_mask.shape)}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(f"{who}: give both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None and (tuple(q_segment_ids.shape) != (B, T) or tuple(kv_segment_ids.shape) != (B, S)):
        raise ValueError(f"{who}: segment ids must be [B, T] = [{B}, {T}] and [B, S] = [{B}, {S}], got "
                         f"{tuple(q_segment_ids.shape)} and {tuple(kv_segment_ids.shape)}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < float("inf")):
        raise ValueError(f"{who}: softcap must be a finite number > 0 or None, got {softcap!r}")
    for name, value in (("block_size", block_size), ("backward_query_block", backward_query_block)):
        check_positive_int(who, name, value)
    P = axis_size(mesh, axis, who=who)
    parts = 2 if causal else 1
    check_divisible(who, "the query length T", T, mesh, axis, parts_per_device=parts)
    check_divisible(who, "the key length S", S, mesh, axis, parts_per_device=parts)
    if batch_axis is not None:
        if batch_axis == axis:
            raise ValueError(f"{who}: batch_axis and axis are both {axis!r}; the batch needs its own mesh axis or None")
        check_divisible(who, "the batch size B", B, mesh, batch_axis)

    arrays = {"q": q, "k": k, "v": v, "kv_mask": kv_mask, "q_seg": q_segment_ids, "k_seg": kv_segment_ids}
    order = zigzag_order(T, P) if causal and not zigzag_input else None
    if order is not None:
        arrays = {name: None if x is None else x[:, order] for name, x in arrays.items()}
    given = {name: x for name, x in arrays.items() if x is not None}
    body = functools.partial(_ring_shard, axis=axis, devices=P, causal=causal, block=int(block_size),
                             block_q=int(backward_query_block), softcap=None if softcap is None else float(softcap))

    def shard(*xs):
        kw = dict.fromkeys(arrays)
        kw.update(zip(given, xs))
        return body(**kw)

    # every input is split along the sequence (and the batch): nothing is replicated, so the
    # varying-type check has nothing to add; it is off because the kernel's loops start from
    # constants (its checks would refuse them as carries of a varying loop)
    spec = PartitionSpec(batch_axis, axis)
    out = jax.shard_map(shard, mesh=mesh, in_specs=tuple(spec for _ in given), out_specs=spec,
                        check_vma=False)(*given.values())
    if order is not None:
        out = out[:, np.argsort(order)]
    return out


# --------------------------------------------------------------------------- as a model core


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """Where the ring runs and the per-device kernel's block sizes."""

    axis: str = "seq"  # mesh axis the sequence is split over
    batch_axis: str | None = None  # mesh axis the batch is split over, or None (replicated)
    block_size: int = 1024  # the kernel's forward block / backward key block, per device
    backward_query_block: int = 256  # the kernel's backward query block

    def __post_init__(self):
        check_config("ring", isinstance(self.axis, str) and bool(self.axis),
                     f"axis must be a mesh axis name, got {self.axis!r}")
        check_config("ring", self.batch_axis is None or isinstance(self.batch_axis, str),
                     f"batch_axis must be a mesh axis name or None, got {self.batch_axis!r}")
        check_positive_int("ring", "block_size", self.block_size)
        check_positive_int("ring", "backward_query_block", self.backward_query_block)


class RingAttention(Attention):
    """Ring attention as an attention core (the sequence-parallel form of every exact variant).

    Built by ``efficient_attn.parallel.sequence_parallel`` in place of an exact core; the
    base class validates inputs and enforces the capabilities below as for any variant.
    """

    variant_name = "ring"
    capabilities = Capabilities(causal=True, cross=True, kv_mask=True, exact=True, gqa=True, segments=True,
                                time="O(N^2 / P) per device", memory="O(N / P) per device")

    def __init__(self, config: RingConfig, dims: Dims, *, mesh: Mesh):
        super().__init__(config, dims, rngs=None)
        axis_size(mesh, config.axis, who="ring")
        if config.batch_axis is not None:
            axis_size(mesh, config.batch_axis, who="ring")
        self.mesh = mesh

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        c = self.config
        return ring_attention(q, k, v, mesh=self.mesh, axis=c.axis, batch_axis=c.batch_axis, causal=mask.causal,
                              kv_mask=mask.kv_mask, q_segment_ids=mask.q_segment_ids,
                              kv_segment_ids=mask.kv_segment_ids, block_size=c.block_size,
                              backward_query_block=c.backward_query_block)
