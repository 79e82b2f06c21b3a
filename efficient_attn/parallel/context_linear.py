"""Context-parallel linear and gated linear attention: the sequence split over a mesh axis.

A linear recurrence needs no ring: what device i contributes to every later position is one
state, so the devices exchange states, not keys. Device i holds positions
[i n, (i + 1) n) (contiguous placement; the work is the same on every device). The form of
fla's ``ops/cp`` and MaxText's context parallelism, here on JAX's own collectives:

1. each device computes its local outputs with a zero incoming state, and its local state;
2. the local states are all-gathered (``lax.all_gather``) and combined in sequence order;
3. each device adds the contribution of the state that enters it.

Linear attention (``ops.linear_attention``; phi the feature maps, v1 = [v | 1] so the
denominator rides along as a last column):

    S_i = phi(K_i)^T v1_i,     S_in(i) = sum_{j < i} S_j                 (causal)
    [num | den]_t = local_t + phi(q_t) S_in(i),    out = num / (den + eps)
    non-causal: [num | den]_t = phi(q_t) sum_j S_j  (an all-reduce of the states)

With per-key log scales (FAVOR+), each state is kept at the scale of its own largest key,
exp(-top_i); the incoming one at that of the running maximum top_in = max_{j < i} top_j;
row t combines both at its own M_t = max(top_in, row_top_t), so every exponent is <= 0 and
the output is the engine's (its per-row scale cancels in num / den). Non-causal: one global
maximum (``lax.pmax``).

Gated linear attention (``ops.gated_linear``; S_t = diag(a_t) S_{t-1} + k_t v_t^T,
a_t = exp(g_t)): device i's zero-start final state F_i and its total log decay
G_i = sum of its g (a scalar per head, or one per key channel) are gathered; the states
entering the devices follow the same recurrence one level up, decays multiplying across
device boundaries,

    S_in(0) = S_init,    S_in(i + 1) = exp(G_i) S_in(i) + F_i          (a scan over P states)

and device i adds the decayed incoming state to its local outputs,

    o_t += scale * (q_t * exp(c_t))^T S_in(i),    c_t = sum of g from the device's start to t

(the engine's own "inter" term for an initial state). The final state of the whole sequence
is S_in(P), the same on every device.

Backward passes are JAX's autodiff of these (the transpose of an all-gather is a
reduce-scatter). Communication per device: one state [b, H, F, Dv + 1] (gated: [b, H, Dk, Dv]
and its log decay) into one all-gather. Memory per device: O(n) plus P states.

What experiments need to know: equal to the one-device engines forward and backward (tests
at P = 2, 4, 8, causal and not, key padding, scalar and diagonal gates); T (and S) must be
multiples of P; compute is float32.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Bool, Float

from efficient_attn.ops.gated_linear import gated_linear_attention
from efficient_attn.ops.linear_attention import NEG, causal_chunked, normalise
from efficient_attn.ops.masks import split_nonfinite
from efficient_attn.parallel.mesh import axis_size, check_divisible

__all__ = ["context_linear_attention", "context_gated_linear_attention", "state_bytes"]


def _check_mesh(who: str, mesh: Mesh, axis: str, batch_axis: str | None, B: int, lengths: dict[str, int]) -> int:
    P = axis_size(mesh, axis, who=who)
    for what, n in lengths.items():
        check_divisible(who, what, n, mesh, axis)
    if batch_axis is not None:
        if batch_axis == axis:
            raise ValueError(f"{who}: batch_axis and axis are both {axis!r}; the batch needs its own mesh axis or None")
        check_divisible(who, "the batch size B", B, mesh, batch_axis)
    return P


def _earlier(stacked, axis: str):
    """Per device, which of the P gathered entries come from earlier devices: [P] bool."""
    return jnp.arange(stacked.shape[0]) < lax.axis_index(axis)


# ----------------------------------------------------------------------------- linear attention


def _linear_shard(phi_q, phi_k, v, kv_mask, log_scale, *, axis, causal, eps, chunk):
    """One device's part; every array is its own slice of the sequence."""
    phi_q, phi_k, v = (x.astype(jnp.float32) for x in (phi_q, phi_k, v))
    if log_scale is not None:
        log_scale = log_scale.astype(jnp.float32)
    # the engine's input rules: a bad value poisons its key; masked keys add nothing
    v, bad = split_nonfinite(v)
    phi_k = jnp.where(bad[..., None], jnp.nan, phi_k)
    if kv_mask is not None:
        keep = kv_mask[:, :, None]
        phi_k = jnp.where(keep[..., None], phi_k, 0.0)
        v = jnp.where(keep[..., None], v, 0.0)
        if log_scale is not None:
            log_scale = jnp.where(keep, log_scale, NEG)
    v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)

    if not causal:
        if log_scale is not None:
            top = lax.pmax(jnp.max(lax.stop_gradient(log_scale), axis=1, keepdims=True), axis)  # [b, 1, H]
            phi_k = phi_k * jnp.exp(log_scale - top)[..., None]
        kv = lax.psum(jnp.einsum("bshf,bshe->bhfe", phi_k, v1), axis)
        nd = jnp.einsum("bthf,bhfe->bthe", phi_q, kv)
        return normalise(nd[..., :-1], nd[..., -1:], eps)

    # the engine's grouped layout with one query head per kv head: [b, n, H, 1, F] -> [b, n, H, E]
    local = causal_chunked(phi_q[:, :, :, None], phi_k, v1, log_scale, chunk)[:, :, :, 0]  # zero incoming state
    if log_scale is None:
        states = lax.all_gather(jnp.einsum("bshf,bshe->bhfe", phi_k, v1), axis)  # [P, b, H, F, E]
        incoming = jnp.sum(jnp.where(_earlier(states, axis)[:, None, None, None, None], states, 0.0), axis=0)
        nd = local + jnp.einsum("bthf,bhfe->bthe", phi_q, incoming)
        return normalise(nd[..., :-1], nd[..., -1:], eps)

    ls = lax.stop_gradient(log_scale)
    row_top = jnp.maximum(NEG, lax.cummax(ls, axis=1))  # [b, n, H]: the scale of ``local``'s rows
    top = jnp.maximum(NEG, jnp.max(ls, axis=1))  # [b, H]: this device's state scale
    state = jnp.einsum("bshf,bshe->bhfe", phi_k * jnp.exp(log_scale - top[:, None])[..., None], v1)
    states, tops = lax.all_gather(state, axis), lax.all_gather(top, axis)  # [P, b, H, F, E], [P, b, H]
    earlier = _earlier(tops, axis)[:, None, None]
    top_in = jnp.max(jnp.where(earlier, tops, NEG), axis=0)  # [b, H]
    weight = jnp.where(earlier, jnp.exp(jnp.where(earlier, tops - top_in, 0.0)), 0.0)
    incoming = jnp.einsum("pbh,pbhfe->bhfe", weight, states)  # at scale exp(-top_in)
    row_scale = jnp.maximum(row_top, top_in[:, None])  # [b, n, H]
    nd = (local * jnp.exp(row_top - row_scale)[..., None]
          + jnp.einsum("bthf,bhfe->bthe", phi_q, incoming) * jnp.exp(top_in[:, None] - row_scale)[..., None])
    return normalise(nd[..., :-1], nd[..., -1:], 0.0)


def context_linear_attention(
    phi_q: Float[Array, "B T H F"],
    phi_k: Float[Array, "B S H F"],
    v: Float[Array, "B S H Dv"],
    *,
    mesh: Mesh,
    axis: str = "seq",
    batch_axis: str | None = None,
    causal: bool = False,
    kv_mask: Bool[Array, "B S"] | None = None,
    k_log_scale: Float[Array, "B S H"] | None = None,
    eps: float = 0.0,
    chunk_size: int = 64,
) -> Float[Array, "B T H Dv"]:
    """``ops.linear_attention`` with the sequence split over mesh axis ``axis`` (module
    docstring); the same arguments, plus the mesh. T and S must be multiples of the axis
    size (causal: T == S); ``chunk_size`` is the in-device chunk. Returns float32."""
    who = "context_linear_attention"
    B, T, H, F = phi_q.shape
    S = phi_k.shape[1]
    if phi_k.shape != (B, S, H, F) or v.shape[:3] != (B, S, H):
        raise ValueError(f"{who}: phi_q {phi_q.shape}, phi_k {phi_k.shape}, v {v.shape} disagree (want [B, T|S, H, .])")
    if causal and T != S:
        raise ValueError(f"{who}: causal linear attention needs T == S, got {T} and {S}")
    if k_log_scale is not None and eps != 0:
        raise ValueError(f"{who}: eps must be 0 with k_log_scale (the rescaled denominator has no fixed scale)")
    if kv_mask is not None and (tuple(kv_mask.shape) != (B, S) or kv_mask.dtype != jnp.bool_):
        raise ValueError(f"{who}: kv_mask must be bool [B, S] = [{B}, {S}], got {kv_mask.dtype} {tuple(kv_mask.shape)}")
    _check_mesh(who, mesh, axis, batch_axis, B, {"the query length T": T, "the key length S": S})
    seq = PartitionSpec(batch_axis, axis)
    args = {"phi_q": phi_q, "phi_k": phi_k, "v": v, "kv_mask": kv_mask, "log_scale": k_log_scale}
    given = {name: x for name, x in args.items() if x is not None}

    def body(*xs):
        kw = dict.fromkeys(args)
        kw.update(zip(given, xs))
        return _linear_shard(**kw, axis=axis, causal=causal, eps=float(eps), chunk=int(chunk_size))

    # check_vma=False: the engine's chunk scan starts from a constant zero state, which the
    # varying-type check would refuse as a carry; the tests check every gradient against one device
    fn = jax.shard_map(body, mesh=mesh, in_specs=tuple(seq for _ in given), out_specs=seq, check_vma=False)
    return fn(*given.values())


# ------------------------------------------------------------------------ gated linear attention


def _varying_like(x, like):
    """``x`` typed as varying over the mesh axes ``like`` varies over (a scan carry must keep
    its type: a constant start state of a loop whose body mixes in per-device data)."""
    have, want = (set(jax.typeof(a).manual_axis_type.varying) for a in (x, like))
    axes = tuple(sorted(want - have))
    return lax.pcast(x, axes, to="varying") if axes else x


def _gated_shard(q, k, v, g, kv_mask, initial_state, *, axis, chunk, scale, diagonal):
    zero = _varying_like(jnp.zeros(q.shape[:1] + q.shape[2:] + v.shape[3:], jnp.float32), q)
    out, final = gated_linear_attention(q, k, v, g, kv_mask=kv_mask, chunk=chunk, initial_state=zero,
                                        output_final_state=True, scale=scale)  # zero incoming state
    g = g.astype(jnp.float32)
    if kv_mask is not None:  # a masked position is an identity step: it decays nothing
        g = jnp.where(kv_mask[:, :, None, None] if diagonal else kv_mask[:, :, None], g, 0.0)
    finals = lax.all_gather(final, axis)  # [P, b, H, Dk, Dv]
    decays = lax.all_gather(jnp.sum(g, axis=1), axis)  # [P, b, H] or [P, b, H, Dk]

    def across(state, xs):  # the recurrence one level up: S_in(i + 1) = exp(G_i) S_in(i) + F_i
        f, d = xs
        a = jnp.exp(d)[..., None] if diagonal else jnp.exp(d)[..., None, None]
        return a * state + f, state

    if initial_state is None:
        start = jnp.zeros_like(final)
    else:  # the same on every device; typed varying, as the carry it starts becomes
        start = _varying_like(initial_state.astype(jnp.float32), final)
    last, entering = lax.scan(across, start, (finals, decays))  # entering[i] = S_in(i)
    incoming = entering[lax.axis_index(axis)]
    decay = jnp.exp(jnp.cumsum(g, axis=1))  # from the device's start to t, inclusive
    q_in = q.astype(jnp.float32) * (decay if diagonal else decay[..., None])
    # every device computed the same final state; each returns it, and one copy is kept
    return out + scale * jnp.einsum("bthd,bhde->bthe", q_in, incoming), last[None]


def context_gated_linear_attention(
    q: Float[Array, "B T H Dk"],
    k: Float[Array, "B T H Dk"],
    v: Float[Array, "B T H Dv"],
    log_decay: Float[Array, "B T H"] | Float[Array, "B T H Dk"],
    *,
    mesh: Mesh,
    axis: str = "seq",
    batch_axis: str | None = None,
    kv_mask: Bool[Array, "B T"] | None = None,
    chunk: int = 64,
    initial_state: Float[Array, "B H Dk Dv"] | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
) -> Float[Array, "B T H Dv"] | tuple[Float[Array, "B T H Dv"], Float[Array, "B H Dk Dv"]]:
    """``ops.gated_linear.gated_linear_attention`` with the sequence split over mesh axis
    ``axis`` (module docstring): the same arguments, plus the mesh. T must be a multiple of
    the axis size. Returns ``out`` or ``(out, final_state)``, float32."""
    who = "context_gated_linear_attention"
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{who}: q, k must be [B, T, H, Dk] and v [B, T, H, Dv], got {q.shape}, {k.shape}, {v.shape}")
    B, T, H, Dk = q.shape
    Dv = v.shape[3]
    if log_decay.shape not in ((B, T, H), (B, T, H, Dk)):
        raise ValueError(f"{who}: log_decay must be [B, T, H] or [B, T, H, Dk], got {log_decay.shape}")
    if kv_mask is not None and (tuple(kv_mask.shape) != (B, T) or kv_mask.dtype != jnp.bool_):
        raise ValueError(f"{who}: kv_mask must be bool [B, T] = [{B}, {T}], got {kv_mask.dtype} {tuple(kv_mask.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, Dv):
        raise ValueError(f"{who}: initial_state must be [B, H, Dk, Dv] = {(B, H, Dk, Dv)}, got {initial_state.shape}")
    _check_mesh(who, mesh, axis, batch_axis, B, {"the sequence length T": T})
    scale = Dk**-0.5 if scale is None else float(scale)
    seq, batch = PartitionSpec(batch_axis, axis), PartitionSpec(batch_axis)
    args = {"q": (q, seq), "k": (k, seq), "v": (v, seq), "g": (log_decay, seq), "kv_mask": (kv_mask, seq),
            "initial_state": (initial_state, batch)}
    given = {name: xs for name, xs in args.items() if xs[0] is not None}

    def body(*xs):
        kw = dict.fromkeys(args)
        kw.update(zip(given, xs))
        return _gated_shard(**kw, axis=axis, chunk=int(chunk), scale=scale, diagonal=log_decay.ndim == 4)

    fn = jax.shard_map(body, mesh=mesh, in_specs=tuple(spec for _, spec in given.values()),
                       out_specs=(seq, PartitionSpec(axis, batch_axis)))
    out, finals = fn(*(x for x, _ in given.values()))
    return (out, finals[0]) if output_final_state else out


def state_bytes(batch: int, heads: int, key_dim: int, value_dim: int, *, gated: bool, diagonal: bool = False,
                log_scale: bool = False, itemsize: int = 4) -> int:
    """Bytes one device contributes to the state exchange (one all-gather): its state
    ([b, H, F, Dv + 1] for linear attention, [b, H, Dk, Dv] gated) plus its log decay (gated)
    or its scale (log-scaled linear attention)."""
    if gated:
        return batch * heads * (key_dim * value_dim + (key_dim if diagonal else 1)) * itemsize
    return batch * heads * (key_dim * (value_dim + 1) + (1 if log_scale else 0)) * itemsize
