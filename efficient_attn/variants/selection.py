"""``moba``: learned block selection, each query attends to the key blocks its gate picks.

MoBA (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs"). Keys are
cut into blocks of b = ``block_size`` consecutive positions. A parameter-free gate scores
every block for every query with the mean of the block's keys,

    s_iJ = q_i . mean_{j in J} k_j,       G(i) = TopK_J(s_iJ, k)      (k = ``top_k``)

and query i attends, in one softmax, to the tokens of its selected blocks:

    out_i = sum_{j in blocks of G(i)} softmax_j(q_i . k_j / sqrt(d)) v_j.

Causal (as the paper): a block after query i's own block is never selectable, and the own
block is always selected (it counts as one of the k; inside it the token-level mask j <= i
holds), so the remaining k - 1 slots go to the best earlier blocks. Bidirectional (not in
the paper, which trains causal LMs): every block is a candidate and the gate alone chooses,
own block included; cross attention (T != S) works the same way.

Gradients flow through the softmax over the selected tokens, never through the choice
(top-k indices are integers; the gate reads q and k under ``stop_gradient``), as in MoBA.
Masks: the gate mean is over the block's real keys (``kv_mask``), a block with no real key
scores -inf and is never selected, and masked keys are replaced by zeros before any product,
so whatever they hold (NaN, inf) never reaches an output or a gradient. A non-finite real key
or value enters the gate means and ``p @ v`` as zeros and poisons its own logits instead
(``ops.masks``): the queries that select and see it are NaN, no other; a non-finite query is
gated as a zero query and is NaN wherever it sees a key.

Computation (no [T, S] array anywhere). The block means [B, H, S/b, d] are formed once; then
queries are taken in chunks of c: each chunk scores all S/b blocks ([c, S/b]), takes its top
k, gathers the k selected key/value blocks per query ([c, k b, d]) and runs a masked softmax.
c is set so one chunk's gathered keys stay within ``chunk_budget()`` floats, and each chunk is
``jax.checkpoint``-ed, so the backward pass recomputes a chunk's gate and gathers instead of
storing them: beyond inputs and outputs, memory is O(one chunk). Time O(N^2 d / b) for the
gate (quadratic with a 1/b factor, as in the paper) plus O(N k b d) for the attention.

Why not ``ops.block_sparse``: its table lists key blocks per query *block* and per head,
shared by the batch, while MoBA's selection is per query, per head and per batch element. At
one query per block (folding the batch into the heads) the engine's runs are budgeted by
logits only, while the gathered keys are d times larger: at N = 2048, k = 3, b = 64, d = 16
they hold 6.3M floats, more than N^2 = 4.2M. The engine could gain a batch axis in the table
and a run budget that counts the gathered keys; then MoBA could call it.

What the experiments need to know. Budget: ``top_k`` (selected blocks per query). Exact
limit: top_k >= ceil(N / b) selects every (causally allowed) block: full attention.
Defaults: b = 64, k = 3. The paper's blocks are hundreds of tokens long at 8K-32K contexts
(sparsity around 75-80%); b = 64 keeps that kind of sparsity at this project's lengths of
256-4096 (k b = 192 keys per query).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.core import Attention, Capabilities, Mask, check_positive_int
from efficient_attn.ops import kv_cache
from efficient_attn.ops.masks import masked_softmax, poison_keys, split_nonfinite
from efficient_attn.registry import Budget, register

__all__ = ["MoBAConfig", "MoBA", "block_means", "select_blocks", "moba_attention", "chunk_budget"]


@dataclasses.dataclass(frozen=True)
class MoBAConfig:
    """block_size: keys per block b; top_k: blocks each query attends to (causal: own block included)."""

    block_size: int = 64
    top_k: int = 3

    def __post_init__(self):
        check_positive_int("moba", "block_size", self.block_size)
        check_positive_int("moba", "top_k", self.top_k)


CHUNK_ELEMENTS: int | None = None
"""Floats of gathered keys per query chunk. None: 2**19 on CPU, 2**23 on accelerators."""


def chunk_budget() -> int:
    if CHUNK_ELEMENTS is not None:
        return CHUNK_ELEMENTS
    return 1 << 19 if jax.default_backend() == "cpu" else 1 << 23


def block_means(
    k: Float[Array, "B H S D"], real: Bool[Array, "B S"], block_size: int
) -> tuple[Float[Array, "B H NB D"], Bool[Array, "B NB"]]:
    """Mean of each block's real keys, and whether the block has one (padding is not real)."""
    B, H, S, D = k.shape
    nb = -(-S // block_size)
    pad = nb * block_size - S
    kb = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(B, H, nb, block_size, D)
    rb = jnp.pad(real, ((0, 0), (0, pad))).reshape(B, nb, block_size)
    count = jnp.sum(rb, axis=-1)
    total = jnp.sum(jnp.where(rb[:, None, :, :, None], kb, 0.0), axis=3)
    return total / jnp.maximum(count, 1)[:, None, :, None], count > 0


def select_blocks(
    q: Float[Array, "B H C D"],
    means: Float[Array, "B H NB D"],
    has_real: Bool[Array, "B NB"],
    q_pos: Int[Array, "C"],
    *,
    block_size: int,
    top_k: int,
    causal: bool,
) -> Int[Array, "B H C K"]:
    """The top-k blocks of each query (-1 in slots with no selectable block left)."""
    nb = means.shape[2]
    score = jnp.einsum("bhcd,bhnd->bhcn", q, means)
    ok = has_real[:, None, None, :]
    score = jnp.where(ok, score, -jnp.inf)
    if causal:
        own = (q_pos // block_size)[:, None]
        blocks = jnp.arange(nb)[None, :]
        score = jnp.where(blocks > own, -jnp.inf, score)
        score = jnp.where((blocks == own) & ok, jnp.inf, score)
    best, idx = lax.top_k(score, min(top_k, nb))
    return jnp.where(best > -jnp.inf, idx, -1).astype(jnp.int32)


def _attend_chunk(q_c, pos_c, kb, vb, rb, means, has_real, *, block_size, top_k, causal, scale):
    """One chunk of queries: gate, gather the selected blocks, masked softmax. q_c [B, H, c, D]."""
    B, H = q_c.shape[:2]
    # a non-finite query is gated as a zero query (the choice stays defined) but attends with
    # its own values: its logits, so its output, are NaN wherever it sees a key
    q_gate = jnp.where(jnp.all(jnp.isfinite(q_c), axis=-1, keepdims=True), q_c, 0.0)
    table = select_blocks(
        lax.stop_gradient(q_gate), means, has_real, pos_c, block_size=block_size, top_k=top_k, causal=causal
    )
    slot_ok = table >= 0
    idx = jnp.maximum(table, 0)  # [B, H, c, r]
    bi = jnp.arange(B)[:, None, None, None]
    hi = jnp.arange(H)[None, :, None, None]
    kg, vg = kb[bi, hi, idx], vb[bi, hi, idx]  # [B, H, c, r, b, D|E]
    logits = jnp.einsum("bhcd,bhcrjd->bhcrj", q_c, kg) * scale
    visible = slot_ok[..., None] & rb[bi, idx]  # [B, H, c, r, b]
    if causal:
        k_pos = idx[..., None] * block_size + jnp.arange(block_size)
        visible = visible & (k_pos <= pos_c[:, None, None])
    c, r = idx.shape[2], idx.shape[3]
    p = masked_softmax(logits.reshape(B, H, c, r * block_size), visible.reshape(B, H, c, r * block_size))
    return jnp.einsum("bhcj,bhcje->bhce", p, vg.reshape(B, H, c, r * block_size, -1))


def moba_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S H D"],
    v: Float[Array, "B S H Dv"],
    *,
    block_size: int,
    top_k: int,
    causal: bool = False,
    kv_mask: Bool[Array, "B S"] | None = None,
) -> Float[Array, "B T H Dv"]:
    """MoBA on BTHD arrays, float32 result (see the module docstring)."""
    B, T, H, D = q.shape
    S, E = k.shape[1], v.shape[3]
    real = jnp.ones((B, S), bool) if kv_mask is None else kv_mask
    f32 = lambda x: x.astype(jnp.float32).transpose(0, 2, 1, 3)  # noqa: E731  [B, H, L, .]
    q, k, v = f32(q), f32(k), f32(v)
    k, v = (jnp.where(real[:, None, :, None], x, 0.0) for x in (k, v))
    # a non-finite key or value: zeros in the block means and in p @ v, NaN logits instead,
    # so exactly the queries that select and see it are NaN (ops/masks.py's rules)
    k, k_bad = split_nonfinite(k)
    v, v_bad = split_nonfinite(v)
    means, has_real = block_means(lax.stop_gradient(k), real, block_size)
    k = poison_keys(k, k_bad | v_bad)
    nb = means.shape[2]
    pad = nb * block_size - S
    kb = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(B, H, nb, block_size, D)
    vb = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(B, H, nb, block_size, E)
    rb = jnp.pad(real, ((0, 0), (0, pad))).reshape(B, nb, block_size)

    r = min(top_k, nb)
    per_query = B * H * r * block_size * max(D, E, 1)
    c = max(1, min(T, chunk_budget() // per_query))
    n = -(-T // c)
    attend = jax.checkpoint(
        lambda q_c, pos_c: _attend_chunk(
            q_c, pos_c, kb, vb, rb, means, has_real,
            block_size=block_size, top_k=top_k, causal=causal, scale=1.0 / math.sqrt(D),
        )
    )
    pos = jnp.arange(n * c)
    if n == 1:
        out = attend(q, pos)
    else:
        q_runs = jnp.pad(q, ((0, 0), (0, 0), (0, n * c - T), (0, 0))).reshape(B, H, n, c, D)
        out = lax.map(lambda xs: attend(*xs), (jnp.moveaxis(q_runs, 2, 0), pos.reshape(n, c)))
        out = jnp.moveaxis(out, 0, 2).reshape(B, H, n * c, E)
    return out[:, :, :T].transpose(0, 2, 1, 3)


@register(
    "moba",
    config=MoBAConfig,
    family="selection",
    citation="Lu et al. 2025, MoBA: Mixture of Block Attention for Long-Context LLMs",
    budget=Budget("top_k", (1, 2, 3, 4, 6, 8, 16), length_like=False),
    pattern_setting={"block_size": 8, "top_k": 2},
    exact_limit=lambda n: {"top_k": -(-n // MoBAConfig.block_size)},
)
class MoBA(Attention):
    """MoBA: each query attends to the top-k key blocks of a mean-key gate (own block when causal)."""

    capabilities = Capabilities(
        causal=True, cross=True, kv_mask=True, exact=False, time="O(N^2 d/b + N k b d)", memory="O(N d)", decode=True
    )

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        cfg = self.config
        return moba_attention(
            q, k, v, block_size=cfg.block_size, top_k=cfg.top_k, causal=mask.causal, kv_mask=mask.kv_mask
        )

    # decoding: a KV cache of max_len slots; each step gates the cache's blocks with the
    # block means of its real keys (a block after the query's is empty, its own is always
    # chosen) and attends to the chosen blocks: O(L d / b + k b d) per step, as one query of
    # ``attend``

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        d = self.dims
        return kv_cache.init_cache(batch, max_len, d.num_kv_heads, d.head_dim, d.head_dim, dtype)

    def _prefill(self, q, k, v, mask: Mask, state):
        return self.attend(q, k, v, mask), kv_cache.write(state.data, k, v, 0, mask.kv_mask)

    def _step(self, q_t, k_t, v_t, state):
        cfg = self.config
        cache = kv_cache.write(state.data, k_t[:, None], v_t[:, None], state.position)
        B, L, H, D = cache.k.shape
        b = cfg.block_size
        nb = -(-L // b)
        pad = ((0, 0), (0, nb * b - L), (0, 0), (0, 0))
        k = jnp.pad(cache.k.astype(jnp.float32), pad).transpose(0, 2, 1, 3)  # [B, H, nb b, D]
        v = jnp.pad(cache.v.astype(jnp.float32), pad).transpose(0, 2, 1, 3)
        real = jnp.pad(cache.valid, pad[:2])
        means, has_real = block_means(lax.stop_gradient(k), real, b)
        out = _attend_chunk(
            q_t.astype(jnp.float32)[:, :, None], state.position[None], k.reshape(B, H, nb, b, D),
            v.reshape(B, H, nb, b, v.shape[-1]), real.reshape(B, nb, b), means, has_real,
            block_size=b, top_k=cfg.top_k, causal=True, scale=1.0 / math.sqrt(D),
        )
        return out[:, :, 0], cache
