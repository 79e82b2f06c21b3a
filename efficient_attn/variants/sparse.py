"""Fixed sparse patterns on the block-sparse engine: ``sparse_transformer``, ``longformer``, ``bigbird``.

All three list, per query block, the key blocks it sees (ops/block_sparse.py); masks inside
a block are token-level (causal, kv_mask). None of them forms an N x N matrix or mask.

sparse_transformer -- Child et al., "Generating Long Sequences with Sparse Transformers", 2019.
    The paper factorises attention into two index sets per query with a stride l. Here the
    sets are taken on blocks of ``block_size`` = b tokens (as the paper's block-sparse
    kernels do): with I = i // b, J = j // b and l = ``stride`` (in blocks),

      strided:  A1(I) = { J : 0 <= I - J < l }          A2(I) = { J : (I - J) mod l = 0 }
      fixed:    A1(I) = { J : J // l = I // l }         A2(I) = { J : J mod l = l - 1 }

    (bidirectional: |I - J| < l in strided A1; causal: J <= I everywhere, and j <= i inside
    the diagonal block.) A query attends to the union A1 u A2 in one softmax: the paper's
    "merged head" (section 4.3), not two interleaved heads. With b = 1 these are exactly the
    paper's token patterns (fixed with c = 1); in general "fixed" is the paper's fixed pattern
    with l_tokens = l b and c = b summary tokens, and "strided" is its block-granular version.
    Time O(N b (l + N / (b l))); ``stride=None`` picks l = ceil(sqrt(N / b)), the paper's
    choice that balances the two sets: O(N sqrt(N b)). Memory O(N) for the engine (it works
    through query blocks in bounded runs) plus the O((N / b)^1.5) integer table. Exact when
    l >= N / b.
    Defaults: mode "fixed" as LRA used; block_size 16 (the paper used c in {8, 16, 32});
    LRA's "block 50, c 10" is block_size=10, stride=5.

longformer -- Beltagy et al., "Longformer: The Long-Document Transformer", 2020.
    A sliding window of total width w (``window``): query i sees |i - j| <= w // 2
    (i - w // 2 <= j <= i when causal), plus global attention on the positions listed in
    ``global_tokens``, in both directions: a global query sees every key, every query sees
    the global keys. Computed as three parts: the window over non-global keys on the engine
    (O(N w)), all queries against the g global keys (O(N g)), merged into one softmax by
    logsumexp weighting; then the g global query rows, each against all N keys (O(g N)),
    replace their rows. Exact when every token is global. No dilation (LRA used none).
    Memory O(N) beyond one run of query blocks (at least one block: O(w^2)).
    Defaults are LRA's: window 512, no global tokens.

bigbird -- Zaheer et al., "Big Bird: Transformers for Longer Sequences", NeurIPS 2020 (ITC).
    Blocks of b = ``block_size`` tokens; the first ``num_global_blocks`` = g blocks are
    global (their queries see every key block, every query block sees them); every other
    query block I sees the window {I-1, I, I+1}, the g global blocks, and r =
    ``num_random_blocks`` random key blocks drawn without replacement from the blocks
    outside the window and the global set (causal: only from blocks J < I - 1, before the
    window). The randomness is drawn once from ``rngs`` at construction (per head, as in the
    paper's code) and kept in a non-trainable ``BigBirdRandom`` variable, so the pattern is
    fixed per module; the block ids for a length N are derived from it at call time.
    Time O(N b (g + r + 3)) plus O(g b N) for the global rows; memory O(N) beyond one run of
    query blocks, which holds at least one block (for a global block, b x N logits: O(N b)).
    Exact when g b >= N.
    Defaults: block 64 and 3 random blocks as in LRA and the paper; 2 global blocks as in
    the paper's BigBird-ITC setting (2 x 64 global tokens).

Options of the softmax family, native in all three (``Capabilities`` gqa, segments, softcap,
sinks), on the engine:

- grouped-query k/v: query head h reads kv head h // G by index, never a repeated copy;
- packed sequences (``Mask`` segment ids): the pattern is that of the packed sequence (its
  blocks, strides, global and random blocks are positions of the whole row), and pairs whose
  ids differ are masked inside it. A packed sequence thus sees a subset of what it would see
  alone (the same where the pattern covers its whole segment, e.g. at the exact limit);
- ``softcap`` c: s -> c tanh(s / c) on every logit;
- ``sinks``: a learned value-less logit per head, once in the denominator of every row that
  sees a key (longformer adds it after merging its window and global parts).

Decoding refuses softcap and sinks, and decodes one sequence per row (no segments).

Decoding (``init_state`` / ``prefill`` / ``step``): all three keep a KV cache of the
state's max_len slots and read, per step, the cached keys their pattern gives the step's
position (one masked softmax over the cache: O(max_len d) per step). sparse_transformer's
table is that of a max_len-token sequence (stride=None takes l from max_len), so a decoded
sequence equals its causal forward over max_len tokens.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from efficient_attn.core import Attention, Capabilities, Mask, check_config, check_positive_int
from efficient_attn.ops import kv_cache
from efficient_attn.ops.block_sparse import (
    add_sinks,
    band_block_size,
    banded_table,
    block_sparse_attention,
    merge_softmax,
    num_blocks,
    pad_rows,
)
from efficient_attn.ops.online_softmax import check_softcap
from efficient_attn.registry import Budget, register
from efficient_attn.variants.blockwise import sink_logits


def _bhtd(x):
    return x.transpose(0, 2, 1, 3)


def _unpack(mask: Mask):
    return mask.causal, mask.kv_mask


def _check_options(variant: str, config) -> None:
    """The softmax-family options every config here has: softcap (None or c > 0) and sinks (bool)."""
    check_softcap(variant, config.softcap)
    check_config(variant, isinstance(config.sinks, bool), f"sinks must be True or False, got {config.sinks!r}")


class _SoftmaxOptions(Attention):
    """What the three variants share: the learned sinks, and no decoding with softcap/sinks."""

    def __init__(self, config, dims, *, rngs):
        super().__init__(config, dims, rngs=rngs)
        self.sinks = sink_logits(dims.num_heads, config.sinks)

    def _sink_values(self):
        return None if self.sinks is None else self.sinks[...]

    def _refuse_decoding_options(self) -> None:
        if self.config.softcap is not None or self.config.sinks:
            raise ValueError(
                f"{self.variant_name}: decoding with softcap or sinks is not implemented; build without them to decode"
            )


# ----------------------------------------------------------------------------------------
# Sparse Transformer


@dataclasses.dataclass(frozen=True)
class SparseTransformerConfig:
    """block_size: tokens per block; stride: l in blocks (None: ceil(sqrt(N / block_size)));
    mode: "fixed" or "strided"."""

    block_size: int = 16
    stride: int | None = None
    mode: str = "fixed"
    softcap: float | None = None
    sinks: bool = False

    def __post_init__(self):
        _check_options("sparse_transformer", self)
        check_positive_int("sparse_transformer", "block_size", self.block_size)
        if self.stride is not None:
            check_positive_int("sparse_transformer", "stride", self.stride)
        check_config(
            "sparse_transformer",
            self.mode in ("fixed", "strided"),
            f'mode must be "fixed" or "strided" (Child et al. 2019), got {self.mode!r}',
        )


def sparse_transformer_stride(num_block: int, stride: int | None) -> int:
    """The stride l in blocks: the given one, or ceil(sqrt(num_block))."""
    return stride if stride is not None else max(1, math.ceil(math.sqrt(num_block)))


def sparse_transformer_table(num_block: int, stride: int, mode: str, causal: bool) -> np.ndarray:
    """Key blocks of A1(I) u A2(I) for every query block I (see the module docstring)."""
    l = stride
    rows = []
    for I in range(num_block):
        if mode == "strided":
            a1 = range(max(0, I - l + 1), (I + 1) if causal else min(num_block, I + l))
            a2 = range(I % l, num_block, l)
        else:
            g = I // l
            a1 = range(g * l, min(num_block, (g + 1) * l))
            a2 = range(l - 1, num_block, l)
        union = sorted({J for J in (*a1, *a2) if not causal or J <= I})
        rows.append(union)
    return pad_rows(rows)


@register(
    "sparse_transformer",
    config=SparseTransformerConfig,
    family="sparse",
    citation="Child et al. 2019, Generating Long Sequences with Sparse Transformers",
    budget=Budget("block_size", (4, 8, 16, 32, 64), length_like=True),
    pattern_setting={"block_size": 4},
    exact_limit=lambda n: {"block_size": n},  # one block: every key visible
)
class SparseTransformerAttention(_SoftmaxOptions):
    """Sparse Transformer: the union of a local and a strided (or fixed/summary) block pattern."""

    capabilities = Capabilities(
        causal=True, cross=False, kv_mask=True, exact=False, time="O(N sqrt(N b))", memory="O(N + (N/b)^1.5)",
        gqa=True, segments=True, softcap=True, sinks=True, decode=True,
    )

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S Hkv D"],
        v: Float[Array, "B S Hkv Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        causal, kv = _unpack(mask)
        cfg = self.config
        T = q.shape[1]
        nb = num_blocks(T, cfg.block_size)
        table = sparse_transformer_table(nb, sparse_transformer_stride(nb, cfg.stride), cfg.mode, causal)
        out, _ = block_sparse_attention(
            _bhtd(q), _bhtd(k), _bhtd(v), table, block_q=cfg.block_size, block_k=cfg.block_size,
            causal=causal, kv_valid=kv, q_seg=mask.q_segment_ids, k_seg=mask.kv_segment_ids,
            softcap=cfg.softcap, sinks=self._sink_values(),
        )
        return _bhtd(out)

    # decoding: a KV cache of max_len slots; a step sees the cached keys of the blocks its
    # table row lists (one masked softmax over the cache). The table is the one of a sequence
    # of max_len tokens: with stride=None (l = ceil(sqrt(N / b))) a decoded sequence equals
    # the causal forward over max_len tokens

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        self._refuse_decoding_options()
        d = self.dims
        return kv_cache.init_cache(batch, max_len, d.num_kv_heads, d.head_dim, d.head_dim, dtype)

    def _prefill(self, q, k, v, mask: Mask, state):
        cfg = self.config
        prompt = self
        if cfg.stride is None:  # the stride of max_len tokens, not of the prompt's
            stride = sparse_transformer_stride(num_blocks(state.max_len, cfg.block_size), None)
            prompt = SparseTransformerAttention(dataclasses.replace(cfg, stride=stride), self.dims, rngs=None)
        return prompt.attend(q, k, v, mask), kv_cache.write(state.data, k, v, 0, mask.kv_mask)

    def _step(self, q_t, k_t, v_t, state):
        cfg = self.config
        cache = kv_cache.write(state.data, k_t[:, None], v_t[:, None], state.position)
        L = cache.valid.shape[1]
        nb = num_blocks(L, cfg.block_size)
        table = jnp.asarray(sparse_transformer_table(nb, sparse_transformer_stride(nb, cfg.stride), cfg.mode, True))
        row = table[state.position // cfg.block_size]  # key blocks of this query's block (-1: none)
        listed = jnp.any((jnp.arange(L) // cfg.block_size)[:, None] == row[None, :], axis=-1)
        visible = kv_cache.causal_visible(cache, state.position) & listed[None, None]
        return kv_cache.attend_dense(q_t, cache.k, cache.v, visible), cache


# ----------------------------------------------------------------------------------------
# Longformer


@dataclasses.dataclass(frozen=True)
class LongformerConfig:
    """window: total width w (w // 2 keys each side); global_tokens: positions with global attention."""

    window: int = 512
    global_tokens: tuple[int, ...] = ()
    softcap: float | None = None
    sinks: bool = False

    def __post_init__(self):
        _check_options("longformer", self)
        check_positive_int("longformer", "window", self.window, minimum=2)
        tokens = self.global_tokens
        check_config(
            "longformer",
            isinstance(tokens, (tuple, list)) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens),
            f"global_tokens must be a tuple of non-negative int positions, got {tokens!r}",
        )
        check_config("longformer", len(set(tokens)) == len(tokens), f"global_tokens has duplicates: {tokens!r}")
        object.__setattr__(self, "global_tokens", tuple(sorted(tokens)))


@register(
    "longformer",
    config=LongformerConfig,
    family="sparse",
    citation="Beltagy et al. 2020, Longformer: The Long-Document Transformer",
    budget=Budget("window", (8, 16, 32, 64, 128, 256, 512), length_like=True),  # total width
    pattern_setting={"window": 16},
    exact_limit=lambda n: {"window": 2 * n},  # n keys on each side
)
class LongformerAttention(_SoftmaxOptions):
    """Longformer: a sliding window plus symmetric global attention on chosen positions."""

    capabilities = Capabilities(
        causal=True, cross=False, kv_mask=True, exact=False, time="O(N (w + g))", memory="O(N + w^2)",
        gqa=True, segments=True, softcap=True, sinks=True, decode=True,
    )

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S Hkv D"],
        v: Float[Array, "B S Hkv Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        causal, kv = _unpack(mask)
        B, T, H, _ = q.shape
        gpos = self.config.global_tokens
        if gpos and gpos[-1] >= T:
            raise ValueError(
                f"longformer: global_tokens {gpos} include positions >= the sequence length {T}; "
                "list only positions inside every sequence you call it with"
            )
        qh, kh, vh = _bhtd(q), _bhtd(k), _bhtd(v)
        half = self.config.window // 2
        right = 0 if causal else half
        b = band_block_size(half, T)
        nb = num_blocks(T, b)
        local_kv = kv
        if gpos:
            not_global = jnp.ones((T,), bool).at[np.asarray(gpos)].set(False)
            local_kv = not_global[None] if kv is None else jnp.logical_and(kv, not_global[None])
        qs, ks = mask.q_segment_ids, mask.kv_segment_ids
        opts = dict(softcap=self.config.softcap)
        sinks = self._sink_values()
        out, lse = block_sparse_attention(
            qh, kh, vh, banded_table(nb, nb, b, b, half, right), block_q=b, block_k=b,
            causal=causal, kv_valid=local_kv, band=(half, right), q_seg=qs, k_seg=ks, **opts,
        )
        if not gpos:
            return _bhtd(out if sinks is None else add_sinks(out, lse, sinks)[0])
        g = len(gpos)
        idx = np.asarray(gpos)
        kv_g = None if kv is None else kv[:, idx]
        # every query against the global keys
        out_g, lse_g = block_sparse_attention(
            qh, kh[:, :, idx], vh[:, :, idx], np.zeros((nb, 1), np.int32), block_q=b, block_k=g,
            causal=causal, kv_valid=kv_g, k_pos=idx, q_seg=qs, k_seg=None if ks is None else ks[:, idx], **opts,
        )
        out, lse = merge_softmax([out, out_g], [lse, lse_g])
        if sinks is not None:  # once, in the union's denominator
            out, _ = add_sinks(out, lse, sinks)
        # global queries against every key, in blocks of at most b queries
        bg = min(g, b)
        rows, _ = block_sparse_attention(
            qh[:, :, idx], kh, vh, np.tile(np.arange(nb, dtype=np.int32), (num_blocks(g, bg), 1)),
            block_q=bg, block_k=b, causal=causal, kv_valid=kv, q_pos=idx,
            q_seg=None if qs is None else qs[:, idx], k_seg=ks, sinks=sinks, **opts,
        )
        return _bhtd(out.at[:, :, idx].set(rows))

    # decoding: a KV cache of max_len slots (a global query sees every earlier key); a step
    # sees the window, the global keys, and everything when its own position is global

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        self._refuse_decoding_options()
        d = self.dims
        return kv_cache.init_cache(batch, max_len, d.num_kv_heads, d.head_dim, d.head_dim, dtype)

    def _prefill(self, q, k, v, mask: Mask, state):
        # a global position after the prompt changes no prompt output (causal): leave it out
        inside = tuple(t for t in self.config.global_tokens if t < q.shape[1])
        prompt = self
        if inside != self.config.global_tokens:
            prompt = LongformerAttention(dataclasses.replace(self.config, global_tokens=inside), self.dims, rngs=None)
        return prompt.attend(q, k, v, mask), kv_cache.write(state.data, k, v, 0, mask.kv_mask)

    def _step(self, q_t, k_t, v_t, state):
        p = state.position
        cache = kv_cache.write(state.data, k_t[:, None], v_t[:, None], p)
        L = cache.valid.shape[1]
        is_global = np.zeros((L,), bool)
        is_global[[t for t in self.config.global_tokens if t < L]] = True
        is_global = jnp.asarray(is_global)
        pattern = (jnp.arange(L) >= p - self.config.window // 2) | is_global | is_global[p]
        visible = kv_cache.causal_visible(cache, p) & pattern[None, None]
        return kv_cache.attend_dense(q_t, cache.k, cache.v, visible), cache


# ----------------------------------------------------------------------------------------
# BigBird


@dataclasses.dataclass(frozen=True)
class BigBirdConfig:
    """block_size: tokens per block; num_global_blocks: leading global blocks; num_random_blocks: r."""

    block_size: int = 64
    num_global_blocks: int = 2
    num_random_blocks: int = 3
    softcap: float | None = None
    sinks: bool = False

    def __post_init__(self):
        _check_options("bigbird", self)
        check_positive_int("bigbird", "block_size", self.block_size)
        check_positive_int("bigbird", "num_global_blocks", self.num_global_blocks, minimum=0)
        check_positive_int("bigbird", "num_random_blocks", self.num_random_blocks, minimum=0)


class BigBirdRandom(nnx.Variable):
    """Uniform draws in [0, 1) fixing BigBird's random blocks; not a trainable parameter."""


def bigbird_random_blocks(u, num_block: int, num_global: int, causal: bool):
    """Random key blocks for query blocks ``num_global .. num_block-1``, -1 where too few exist.

    u: [H, >= num_block, r] uniforms. Row I draws r distinct blocks uniformly (sequentially,
    without replacement) from its candidates: [g, num_block) minus the window {I-1, I, I+1}
    (causal: [g, I-1), strictly before the window). Returns int32 [H, num_block - g, r].
    """
    g, nb = num_global, num_block
    r = u.shape[-1]
    I = jnp.arange(g, nb)
    if causal:
        count = jnp.maximum(0, I - 1 - g)
        lo, width = jnp.full_like(I, nb), jnp.zeros_like(I)
    else:
        lo = jnp.maximum(I - 1, g)
        width = jnp.minimum(I + 1, nb - 1) - lo + 1
        count = (nb - g) - width
    u = u[:, g:nb]  # [H, n, r]
    chosen, out = [], []
    for t in range(r):
        left = jnp.maximum(count - t, 1)
        y = jnp.clip(jnp.floor(u[..., t] * left).astype(jnp.int32), 0, left - 1)
        if chosen:  # the y-th candidate not chosen yet: step over earlier picks in ascending order
            prior = jnp.sort(jnp.stack(chosen, -1), axis=-1)
            for s in range(t):
                y = y + (y >= prior[..., s])
        chosen.append(y)
        block = g + y
        block = jnp.where(block >= lo, block + width, block)
        out.append(jnp.where(t < count, block, -1))
    if not out:
        return jnp.zeros((u.shape[0], nb - g, 0), jnp.int32)
    return jnp.stack(out, -1).astype(jnp.int32)


def bigbird_table(u, num_block: int, num_global: int, causal: bool):
    """[H, num_block - g, g + 3 + r] key blocks of the non-global query blocks (-1 = none)."""
    g, nb = num_global, num_block
    H = u.shape[0]
    I = np.arange(g, nb)
    glob = np.broadcast_to(np.arange(g), (len(I), g))
    offsets = (-1, 0) if causal else (-1, 0, 1)
    win = np.stack([I + o for o in offsets], -1)
    win = np.where((win >= g) & (win < nb), win, -1)  # blocks < g are already listed as global
    static = np.concatenate([glob, win], -1).astype(np.int32)
    rand = bigbird_random_blocks(u, nb, g, causal)
    return jnp.concatenate([jnp.broadcast_to(jnp.asarray(static), (H,) + static.shape), rand], -1)


@register(
    "bigbird",
    config=BigBirdConfig,
    family="sparse",
    citation="Zaheer et al. 2020, Big Bird: Transformers for Longer Sequences",
    budget=Budget("block_size", (8, 16, 32, 64, 128), length_like=True),  # 3 window + 2 global + 3 random blocks
    pattern_setting={"block_size": 8},
    exact_limit=lambda n: {"block_size": n},  # one block: every key visible
)
class BigBirdAttention(_SoftmaxOptions):
    """BigBird (ITC): window of 3 blocks + global blocks + random blocks fixed per module."""

    capabilities = Capabilities(
        causal=True, cross=False, kv_mask=True, exact=False, time="O(N b (g + r + 3))", memory="O(N b)",
        gqa=True, segments=True, softcap=True, sinks=True, decode=True,
    )

    def __init__(self, config: BigBirdConfig, dims, *, rngs: nnx.Rngs):
        super().__init__(config, dims, rngs=rngs)
        nb_max = num_blocks(dims.max_len, config.block_size)
        shape = (dims.num_heads, nb_max, config.num_random_blocks)
        self.random = BigBirdRandom(jax.random.uniform(rngs.params(), shape, jnp.float32))

    def table(self, T: int, causal: bool):
        """Key blocks of the non-global query blocks for length T (per head)."""
        nb = num_blocks(T, self.config.block_size)
        return bigbird_table(self.random[...], nb, min(self.config.num_global_blocks, nb), causal)

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S Hkv D"],
        v: Float[Array, "B S Hkv Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        causal, kv = _unpack(mask)
        qs, ks = mask.q_segment_ids, mask.kv_segment_ids
        opts = dict(softcap=self.config.softcap, sinks=self._sink_values(), k_seg=ks)
        T = q.shape[1]
        b = self.config.block_size
        nb = num_blocks(T, b)
        g = min(self.config.num_global_blocks, nb)
        gT = min(g * b, T)
        qh, kh, vh = _bhtd(q), _bhtd(k), _bhtd(v)
        parts = []
        if g:
            rows, _ = block_sparse_attention(
                qh[:, :, :gT], kh, vh, np.tile(np.arange(nb, dtype=np.int32), (g, 1)), block_q=b, block_k=b,
                causal=causal, kv_valid=kv, q_seg=None if qs is None else qs[:, :gT], **opts,
            )
            parts.append(rows)
        if gT < T:
            rest, _ = block_sparse_attention(
                qh[:, :, gT:], kh, vh, self.table(T, causal), block_q=b, block_k=b,
                causal=causal, kv_valid=kv, q_pos=jnp.arange(gT, T), q_seg=None if qs is None else qs[:, gT:], **opts,
            )
            parts.append(rest)
        return _bhtd(jnp.concatenate(parts, axis=2) if len(parts) > 1 else parts[0])

    # decoding: a KV cache of max_len slots; a step in a global block sees every earlier key,
    # any other sees the blocks of its row of ``table`` (per head: global, window, random)

    def _init_decode_state(self, batch: int, max_len: int, dtype):
        self._refuse_decoding_options()
        d = self.dims
        return kv_cache.init_cache(batch, max_len, d.num_kv_heads, d.head_dim, d.head_dim, dtype)

    def _prefill(self, q, k, v, mask: Mask, state):
        return self.attend(q, k, v, mask), kv_cache.write(state.data, k, v, 0, mask.kv_mask)

    def _step(self, q_t, k_t, v_t, state):
        p, b = state.position, self.config.block_size
        cache = kv_cache.write(state.data, k_t[:, None], v_t[:, None], p)
        L = cache.valid.shape[1]
        nb = num_blocks(L, b)
        g = min(self.config.num_global_blocks, nb)
        block = p // b
        listed = jnp.ones((1, L), bool)
        if g < nb:
            row = self.table(L, True)[:, jnp.clip(block - g, 0, nb - g - 1)]  # [H, r]
            listed = jnp.any((jnp.arange(L) // b)[None, :, None] == row[:, None, :], axis=-1)  # [H, L]
        visible = kv_cache.causal_visible(cache, p) & (listed | (block < g))[None]
        return kv_cache.attend_dense(q_t, cache.k, cache.v, visible), cache
