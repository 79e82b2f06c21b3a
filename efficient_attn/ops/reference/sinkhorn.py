"""Dense Sinkhorn attention: the readable reference of ``sinkhorn``'s block attention (``variants/learned.py``).

Tay et al. 2020, "Sparse Sinkhorn Attention", ICML. The variant cuts the sequence (padded to
nb = ceil(N / b) blocks of b) into contiguous blocks and lets the queries of block n attend
jointly to (a) the keys of their own block and (b) b "sorted" slots, slot s being the mixture
over blocks m of key s of block m with the weights P[n, m] of a soft permutation. Here the
sort matrix P [B, H, nb, nb] is an input (the module's ``sort_matrix`` computes it from
``key_blocks``), and everything after it is written out as explicit matrices over the padded
positions j = 0 .. nb b - 1 (block(j) = j // b, slot(j) = j % b, real(j) = kv_mask[j] and j < N):

    M_raw[n, s, j] = P[n, block(j)] real(j) [slot(j) = s]            (mixing weights of slot s)
    mass[n, s]     = sum_j M_raw[n, s, j],   M = M_raw / mass        (where mass > 0)
    Ks[n, s]       = sum_j M[n, s, j] k_j     (and no slot where mass = 0)

    local logit  (i, j) = q_i . k_j / sqrt(d)                        visible: block(j) = block(i),
                                                                     real(j), j <= i if causal
    slot logit   (i, s) = q_i . Ks[block(i), s] / sqrt(d) + log mass[block(i), s]     visible: mass > 0
    [W_local | W_slot] = one masked softmax over the b local and the b slot logits of query i

    A_ij  = W_local[i, j] + sum_s W_slot[i, s] M[block(i), s, j]      (the explicit [T, S] weights)
    out_i = sum_j A_ij v_j

O(N^2 b) memory: small inputs only. Float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from efficient_attn.ops.reference.softmax import masked_softmax_lse

__all__ = ["key_blocks", "sinkhorn_weights", "sinkhorn_attention_reference"]


def _real_positions(B: int, N: int, block_size: int, kv_mask) -> Bool[Array, "B Np"]:
    nb = -(-N // block_size)
    real = jnp.ones((B, N), bool) if kv_mask is None else jnp.asarray(kv_mask, bool)
    return jnp.pad(real, ((0, 0), (0, nb * block_size - N)))


def key_blocks(
    k: Float[Array, "B N H D"], kv_mask: Bool[Array, "B N"] | None, block_size: int
) -> tuple[Float[Array, "B H nb b D"], Bool[Array, "B nb b"]]:
    """What a sorting network reads: keys in blocks of ``block_size`` (padded), zero where not
    real, and which entries are real keys. (The input of ``SinkhornAttention.sort_matrix``.)"""
    B, N, H, D = k.shape
    real = _real_positions(B, N, block_size, kv_mask)
    nb = real.shape[1] // block_size
    kp = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, nb * block_size - N), (0, 0), (0, 0)))
    kp = jnp.where(real[:, :, None, None], kp, 0.0)
    return kp.reshape(B, nb, block_size, H, D).transpose(0, 3, 1, 2, 4), real.reshape(B, nb, block_size)


def sinkhorn_weights(
    q: Float[Array, "B N H D"],
    k: Float[Array, "B N H D"],
    sort_matrix: Float[Array, "B H nb nb"],
    *,
    block_size: int,
    kv_mask: Bool[Array, "B N"] | None = None,
    causal: bool = False,
) -> Float[Array, "B H N N"]:
    """The explicit [N, N] attention weights A of Sinkhorn attention (module docstring)."""
    B, N, H, D = q.shape
    if k.shape[1] != N:
        raise ValueError(f"sinkhorn reference: self-attention only (the local block is the key block at the "
                         f"query's position), got T={N}, S={k.shape[1]}")
    b = block_size
    real = _real_positions(B, N, b, kv_mask)  # [B, Np]
    Np = real.shape[1]
    pad = ((0, 0), (0, Np - N), (0, 0), (0, 0))
    qp = jnp.pad(q.astype(jnp.float32), pad)
    kp = jnp.where(real[:, :, None, None], jnp.pad(k.astype(jnp.float32), pad), 0.0)
    pos = jnp.arange(Np)
    block, slot = pos // b, pos % b

    m_raw = sort_matrix.astype(jnp.float32)[:, :, :, block] * real[:, None, None, :]  # [B, H, nb, Np]
    m_raw = m_raw[:, :, :, None, :] * (slot[None, :] == jnp.arange(b)[:, None])  # [B, H, nb, b, Np]
    mass = jnp.sum(m_raw, axis=-1)  # [B, H, nb, b]
    has = mass > 0
    safe = jnp.where(has, mass, 1.0)
    mix = m_raw / safe[..., None]
    ks = jnp.einsum("bhnsj,bjhd->bhnsd", mix, kp)  # the slots' mixed keys

    scale = 1.0 / math.sqrt(D)
    local = jnp.einsum("bihd,bjhd->bhij", qp, kp) * scale  # [B, H, Np, Np]
    local_vis = (block[:, None] == block[None, :]) & real[:, None, None, :]
    if causal:
        local_vis = local_vis & (pos[None, :] <= pos[:, None])
    sorted_logits = jnp.einsum("bihd,bhisd->bhis", qp, ks[:, :, block]) * scale + jnp.log(safe)[:, :, block]
    sorted_vis = has[:, :, block]  # [B, H, Np, b]
    w, _ = masked_softmax_lse(jnp.concatenate([local, sorted_logits], axis=-1),
                              jnp.concatenate([jnp.broadcast_to(local_vis, local.shape), sorted_vis], axis=-1))
    a = w[..., :Np] + jnp.einsum("bhis,bhisj->bhij", w[..., Np:], mix[:, :, block])
    return a[:, :, :N, :N]


def sinkhorn_attention_reference(
    q: Float[Array, "B N H D"],
    k: Float[Array, "B N H D"],
    v: Float[Array, "B N H Dv"],
    sort_matrix: Float[Array, "B H nb nb"],
    *,
    block_size: int,
    kv_mask: Bool[Array, "B N"] | None = None,
    causal: bool = False,
) -> Float[Array, "B N H Dv"]:
    """Sinkhorn attention's output, densely: ``sinkhorn_weights`` applied to v."""
    a = sinkhorn_weights(q, k, sort_matrix, block_size=block_size, kv_mask=kv_mask, causal=causal)
    v = v.astype(jnp.float32)
    if kv_mask is not None:
        v = jnp.where(jnp.asarray(kv_mask, bool)[:, :, None, None], v, 0.0)
    return jnp.einsum("bhij,bjhe->bihe", a, v)
