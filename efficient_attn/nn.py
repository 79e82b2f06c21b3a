"""Models around any registered attention core: multi-head attention, LRA's encoder, a causal LM.

``MultiHeadAttention`` is the usual projection sandwich around a core chosen by name:

    q = x W_q,  k = c W_k,  v = c W_v        (c = context, or x for self-attention)
    out = concat_h core(q_h, k_h, v_h) W_o    (core = efficient_attn.build(attention, ...))

so the projections cost O(N F^2) and the core costs what its variant says (``full``:
O(N^2 d) time and memory; the efficient ones less).

Grouped-query attention (``num_kv_heads`` = Hkv, default ``num_heads``; the models' configs
take it too): W_k and W_v project to Hkv heads instead of H, so their parameters shrink by
H / Hkv, and the core is built with ``num_kv_heads`` (query head h reads kv head h // (H / Hkv),
natively: no copy of k or v per query head). A core without the ``gqa`` capability is refused
at construction with a ``CapabilityError``. Decoding states (``CausalLM.generate``) then hold
Hkv heads.

Fast exact path (``fast_exact=True``, the default): a core whose registration names a faster
variant computing the same function (``get_spec(attention).fast_exact``: ``full`` names
``blockwise``, the online-softmax kernel of ``ops.online_softmax``, equal to float32 rounding
forward and backward, tests/test_nn.py checks both) runs on that twin, in O(N) memory and 2-3x
less time on a CPU. The twin is built with its own defaults, so it is used only when no
``attention_kwargs`` are given, and only for calls it can honour (its capabilities: ``blockwise``
takes no dense mask); otherwise, and with ``fast_exact=False``, the named variant itself runs.
The cost experiment's model-level table (LRA Table 2 analog) sets ``fast_exact=False`` so that
its ``full`` row is the quadratic Transformer.

``Classifier`` is the Long Range Arena encoder (Tay et al. 2020, "Long Range Arena: A
Benchmark for Efficient Transformers", arXiv 2011.04006; configs in the LRA repository):
token + position embeddings (``position="learned"``, the default: a trained table;
``"sinusoidal"``: the fixed sin/cos table of Vaswani et al. 2017, which LRA's model code uses
when ``learn_pos_emb=False``; ``"rotary"``: no table, queries and keys rotated by their
position before every core, RoPE of Su et al. 2021, see ``rotate``), pre-LayerNorm blocks

    x = x + Attn(LN(x));   x = x + MLP(LN(x))      MLP = Dense -> GELU -> Dense

a final LayerNorm, CLS pooling (a learned CLS vector prepended, so the attention sees
L + 1 positions) or mean pooling over real tokens, then a Dense -> ReLU -> Dense head.
``CausalLM`` is the same stack under a causal mask with a per-position vocabulary head.
Defaults are LRA's text-task sizes (4 layers, width 256, 4 heads, MLP 1024); dropout
defaults to 0 (LRA used 0.1) so that small CPU runs are deterministic and fast.

Short convolution (``short_conv`` = kernel size K, 0 = off, the default): a causal depthwise
convolution on the token embeddings, added to them before the positions and the first block,

    x_t <- x_t + b + sum_{j=0}^{K-1} w_j * x_{t-j}      (x_{t-j} = 0 before the start; * per feature)

so that one attention layer already sees each token together with its K - 1 predecessors.
Zoology (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language
Models") and Based (Arora et al. 2024) give every sequence mixer a short convolution for a
fair comparison, and Mamba-2, Gated DeltaNet and Based blocks contain one: with it, the
previous-token lookup that associative recall needs is learnable in a few hundred steps.
Padded positions are zeroed before the convolution, so a real token never reads padding; being
causal, it leaks nothing into a causal LM. The classifier convolves the tokens before its CLS
vector is prepended. Each model creates it after all its other layers, so turning it on leaves
the initialisation of the rest of the model unchanged.

Packed rows (``CausalLM(tokens, mask, segment_ids=...)``, ``tasks/packing.py``): several
sequences share a row, ``segment_ids`` ``[B, L]`` sorted (0, 0, 1, 1, 1, 2, ...). The attention
gets ``Mask(causal=True, q_segment_ids=ids, kv_segment_ids=ids)`` (a core without the
``segments`` capability refuses); positions restart at 0 at each segment start (the learned
and sinusoidal tables and the rotary angle are indexed by the position within the segment,
``segment_positions``); the short convolution reads no token of another segment. Each
sequence's logits are then those it gets alone (tests/tasks/test_packing.py).

Masks: the token mask goes to the attention as ``Mask(kv_mask=...)`` (with ``causal=True``
in the LM), so padded keys never reach a real token. No ``q_mask`` is passed: outputs at
padded positions are never read (CLS pooling reads position 0, mean pooling gives padding
weight 0, LM targets there are ignored), so zeroing them would be work without effect.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.core import Capabilities, CapabilityError, Mask, check_config, check_positive_int
from efficient_attn.registry import build, get_spec

__all__ = ["MultiHeadAttention", "ShortConv", "EncoderConfig", "LMConfig", "Block", "Classifier", "CausalLM",
           "segment_positions"]


def _kwargs_dict(kwargs: Any) -> dict:
    """``attention_kwargs`` as a dict: accepts None, a dict, or a tuple of (key, value) pairs."""
    if kwargs is None:
        return {}
    return dict(kwargs)


class MultiHeadAttention(nnx.Module):
    """Query/key/value/output projections around a registered attention core.

    ``attention`` names a variant in the registry (``efficient_attn.list_variants()``);
    ``attention_kwargs`` are its hyperparameters. ``qkv_features`` (default ``in_features``)
    is split into ``num_heads`` heads of ``qkv_features // num_heads``; keys and values have
    ``num_kv_heads`` heads of that width (default ``num_heads``; fewer is grouped-query
    attention and must divide ``num_heads``). ``fast_exact``: run the core on its registered
    fast exact twin where that can take the call (module docstring); ``fast_core`` is that
    twin, or None.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        max_len: int,
        attention: str = "full",
        attention_kwargs: dict | None = None,
        qkv_features: int | None = None,
        out_features: int | None = None,
        fast_exact: bool = True,
        rotary: bool = False,
        num_kv_heads: int | None = None,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        qkv_features = in_features if qkv_features is None else qkv_features
        out_features = in_features if out_features is None else out_features
        for field, value in (("num_heads", num_heads), ("in_features", in_features),
                             ("qkv_features", qkv_features), ("out_features", out_features),
                             ("max_len", max_len), ("num_kv_heads", num_kv_heads)):
            check_positive_int("MultiHeadAttention", field, value)
        _check_kv_heads("MultiHeadAttention", num_heads, num_kv_heads)
        check_config(
            "MultiHeadAttention",
            qkv_features % num_heads == 0,
            f"qkv_features={qkv_features} must be divisible by num_heads={num_heads}; "
            f"use a multiple such as {num_heads * max(1, qkv_features // num_heads)}",
        )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = qkv_features // num_heads
        self.attention = attention
        check_config("MultiHeadAttention", not rotary or self.head_dim % 2 == 0,
                     f"rotary positions rotate pairs of features: head_dim={self.head_dim} must be even")
        self.rotary = rotary
        heads, kv_heads = (num_heads, self.head_dim), (num_kv_heads, self.head_dim)
        self.query = nnx.LinearGeneral(in_features, heads, rngs=rngs)
        self.key = nnx.LinearGeneral(in_features, kv_heads, rngs=rngs)
        self.value = nnx.LinearGeneral(in_features, kv_heads, rngs=rngs)
        self.out = nnx.LinearGeneral(heads, out_features, axis=(-2, -1), rngs=rngs)
        self.core = build(
            attention,
            num_heads=num_heads,
            head_dim=self.head_dim,
            max_len=max_len,
            rngs=rngs,
            num_kv_heads=num_kv_heads,
            **_kwargs_dict(attention_kwargs),
        )
        # the twin computes the same function at its defaults: only without hyperparameters.
        # No rngs: drawing from them would move the initialisation of every later layer.
        twin = get_spec(attention).fast_exact if fast_exact and not _kwargs_dict(attention_kwargs) else None
        if twin and num_kv_heads != num_heads and not get_spec(twin).capabilities.gqa:
            twin = None  # the twin must take the same grouped k/v
        self.fast_core = (build(twin, num_heads=num_heads, head_dim=self.head_dim, max_len=max_len,
                                num_kv_heads=num_kv_heads) if twin else None)

    def qkv(
        self, x: Float[Array, "B T F"], context: Float[Array, "B S F"] | None = None
    ) -> tuple[Float[Array, "B T H D"], Float[Array, "B S Hkv D"], Float[Array, "B S Hkv D"]]:
        """The projected queries ``[B, T, H, D]``, keys and values ``[B, S, Hkv, D]``."""
        context = x if context is None else context
        return self.query(x), self.key(context), self.value(context)

    def __call__(
        self,
        x: Float[Array, "B T F"],
        *,
        context: Float[Array, "B S F"] | None = None,
        mask: Mask | None = None,
        positions: Int[Array, "B T"] | None = None,
    ) -> Float[Array, "B T O"]:
        """``positions``: the rotary angle's position of each token (self-attention only;
        None = 0 .. T-1), e.g. positions within packed segments."""
        q, k, v = self.qkv(x, context)
        if self.rotary:
            if positions is not None and context is not None:
                raise ValueError("MultiHeadAttention: positions are for self-attention; with a context, "
                                 "rotate queries and keys yourself or pass positions=None")
            q = rotate(q, jnp.arange(q.shape[1]) if positions is None else positions)
            k = rotate(k, jnp.arange(k.shape[1]) if positions is None else positions)
        core = self.core
        if self.fast_core is not None and _can_take(self.fast_core.capabilities, mask, q.shape[1] != k.shape[1]):
            core = self.fast_core
        return self.out(core(q, k, v, mask=mask))


def _check_kv_heads(who: str, num_heads: int, num_kv_heads) -> None:
    check_config(who, num_heads % num_kv_heads == 0,
                 f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (grouped-query attention: each kv "
                 f"head serves num_heads / num_kv_heads query heads); choose one of "
                 f"{[d for d in range(1, num_heads + 1) if num_heads % d == 0]}")


def _can_take(caps: Capabilities, mask: Mask | None, cross: bool) -> bool:
    """Whether a core with ``caps`` honours a call with ``mask`` (and T != S when ``cross``)."""
    mask = Mask() if mask is None else mask
    return ((caps.causal if mask.causal else caps.bidirectional)
            and (caps.kv_mask or mask.kv_mask is None)
            and (caps.dense_mask or mask.dense is None)
            and (caps.segments or mask.q_segment_ids is None)
            and (caps.cross or not cross))


POSITIONS = ("sinusoidal", "learned", "rotary")


def rotate(x: Float[Array, "B T H D"], positions: Int[Array, " T"] | Int[Array, "B T"],
           base: float = 10000.0) -> Float[Array, "B T H D"]:
    """Rotary position embedding (RoPE; Su et al. 2021, "RoFormer", arXiv 2104.09864, eq. 34):
    feature pairs (x_i, x_{i + D/2}) of the token at position p are rotated by the angle
    p * theta_i, theta_i = base^(-2i/D), so that <rotate(q, m), rotate(k, n)> depends on m - n
    only. Applied to queries and keys before any core, it gives every variant the same
    relative-position signal (a kernel variant sees the rotated vectors, as in RoFormer's
    Performer experiments). The half-split pairing (as in GPT-NeoX) is a fixed permutation of
    the paper's interleaved one. ``positions`` is one row ``[T]`` for every batch row, or
    ``[B, T]`` (packed rows: positions within each segment)."""
    half = x.shape[-1] // 2
    theta = jnp.exp(-jnp.log(base) * jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
    angle = positions.astype(jnp.float32)[..., None] * theta  # [T, D/2] or [B, T, D/2]
    angle = angle if angle.ndim == 3 else angle[None]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    a, b = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(x.dtype)


def _check_model_config(cfg: EncoderConfig | LMConfig) -> None:
    """The checks both model configs share (sizes, dropout, attention and its kwargs, fast
    path, positions); a dict of ``attention_kwargs`` is stored as sorted (name, value) pairs
    so that the frozen config stays hashable."""
    name = type(cfg).__name__
    if cfg.num_kv_heads is None:
        object.__setattr__(cfg, "num_kv_heads", cfg.num_heads)
    for field in ("vocab_size", "max_len", "num_classes", "num_layers", "emb_dim", "num_heads", "mlp_dim",
                  "num_kv_heads"):
        check_positive_int(name, field, getattr(cfg, field))
    _check_kv_heads(name, cfg.num_heads, cfg.num_kv_heads)
    check_config(name, cfg.emb_dim % cfg.num_heads == 0,
                 f"emb_dim={cfg.emb_dim} must be divisible by num_heads={cfg.num_heads}")
    check_config(name, isinstance(cfg.dropout, (int, float)) and 0.0 <= cfg.dropout < 1.0,
                 f"dropout must be in [0, 1), got {cfg.dropout!r}")
    if isinstance(cfg.attention_kwargs, dict):
        object.__setattr__(cfg, "attention_kwargs", tuple(sorted(cfg.attention_kwargs.items())))
    check_config(name, all(isinstance(p, tuple) and len(p) == 2 for p in cfg.attention_kwargs),
                 f"attention_kwargs must be a tuple of (name, value) pairs, got {cfg.attention_kwargs!r}")
    check_config(name, isinstance(cfg.fast_exact, bool), f"fast_exact must be True or False, got {cfg.fast_exact!r}")
    check_config(name, cfg.position in POSITIONS, f"position must be one of {POSITIONS}, got {cfg.position!r}")
    check_config(name, isinstance(cfg.short_conv, int) and not isinstance(cfg.short_conv, bool) and cfg.short_conv >= 0,
                 f"short_conv is a kernel size (0 = no short convolution, else e.g. 3 or 4), got {cfg.short_conv!r}")
    spec = get_spec(cfg.attention)  # unknown variant: fail now, with the registered names
    if cfg.num_kv_heads != cfg.num_heads and not spec.capabilities.gqa:
        raise CapabilityError(cfg.attention, f"grouped-query attention (num_kv_heads={cfg.num_kv_heads} < "
                                             f"num_heads={cfg.num_heads})", "gqa")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Sizes of the LRA encoder classifier (defaults: LRA's text task).

    ``max_len`` is the longest token sequence (without the CLS token, which the model adds).
    ``attention_kwargs`` is a tuple of ``(name, value)`` pairs so that the config stays
    hashable; ``pool`` is ``"cls"`` or ``"mean"``.
    """

    vocab_size: int
    max_len: int
    num_classes: int
    num_layers: int = 4
    emb_dim: int = 256
    num_heads: int = 4
    mlp_dim: int = 1024
    pool: str = "cls"
    attention: str = "full"
    attention_kwargs: tuple = ()
    dropout: float = 0.0
    fast_exact: bool = True  # run on the variant's fast exact twin, if it has one (module docstring)
    position: str = "learned"  # or "sinusoidal" or "rotary" (see the module docstring)
    short_conv: int = 0  # kernel of the causal depthwise convolution on the embeddings; 0 = none
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = num_heads

    def __post_init__(self):
        _check_model_config(self)
        check_config(type(self).__name__, self.pool in ("cls", "mean"), f"pool must be 'cls' or 'mean', got {self.pool!r}")

    @property
    def attention_len(self) -> int:
        """Positions the attention sees: ``max_len`` plus the CLS token when pooling by CLS."""
        return self.max_len + (1 if self.pool == "cls" else 0)


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Sizes of the causal language model (``num_classes`` = output vocabulary, default input's)."""

    vocab_size: int
    max_len: int
    num_classes: int | None = None
    num_layers: int = 4
    emb_dim: int = 256
    num_heads: int = 4
    mlp_dim: int = 1024
    attention: str = "full"
    attention_kwargs: tuple = ()
    dropout: float = 0.0
    fast_exact: bool = True  # run on the variant's fast exact twin, if it has one (module docstring)
    position: str = "learned"  # or "sinusoidal" or "rotary" (see the module docstring)
    short_conv: int = 0  # kernel of the causal depthwise convolution on the embeddings; 0 = none
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = num_heads

    def __post_init__(self):
        if self.num_classes is None:
            object.__setattr__(self, "num_classes", self.vocab_size)
        _check_model_config(self)
        check_config(type(self).__name__, get_spec(self.attention).capabilities.causal,
                     f"variant {self.attention!r} cannot do causal masking, which a causal LM needs")

    @property
    def attention_len(self) -> int:
        return self.max_len


def sinusoidal_table(length: int, features: int) -> Float[Array, "L F"]:
    """Fixed position table (Vaswani et al. 2017, sec. 3.5; LRA's ``sinusoidal_init``):

        PE[p, 2i] = sin(p / 10000^(2i/F)),   PE[p, 2i+1] = cos(p / 10000^(2i/F))

    (an odd ``features`` F keeps only the sine of the last pair)."""
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    freq = jnp.exp(-jnp.log(10000.0) * jnp.arange(0, features, 2, dtype=jnp.float32) / features)
    table = jnp.zeros((length, features), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(pos * freq))
    return table.at[:, 1::2].set(jnp.cos(pos * freq)[:, : features // 2])


def segment_positions(segment_ids: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """Each token's position within its segment: t minus the index where its segment starts
    (a segment starts where the id changes; ids as packing writes them, sorted)."""
    T = segment_ids.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


def _dropout(x, rate: float, key):
    """Inverted dropout with an explicit key (None = evaluation: identity)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class ShortConv(nnx.Module):
    """Causal depthwise convolution of kernel ``K`` over ``[B, T, F]``, added to its input:

        y_t = x_t + b + sum_{j=0}^{K-1} w[j] * x_{t-j}     (x before position 0 is zero)

    ``w`` is ``[K, F]`` (one filter per feature: depthwise), ``b`` is ``[F]``. Written as K
    shifted products rather than a convolution primitive: K is 3 or 4, and the sum reads as
    the formula."""

    def __init__(self, features: int, kernel: int, *, rngs: nnx.Rngs):
        check_positive_int("ShortConv", "kernel", kernel)
        check_positive_int("ShortConv", "features", features)
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (kernel, features)) / np.sqrt(kernel))
        self.bias = nnx.Param(jnp.zeros((features,)))

    def __call__(self, x: Float[Array, "B T F"], mask: Bool[Array, "B T"] | None = None,
                 segment_ids: Int[Array, "B T"] | None = None) -> Float[Array, "B T F"]:
        """``segment_ids`` (packed rows): x_{t-j} is read only where it is of t's segment, so
        each segment is convolved as if it started the row."""
        if mask is not None:  # padding contributes nothing to a real token
            x = jnp.where(mask[..., None], x, 0.0).astype(x.dtype)
        w = self.kernel[...].astype(x.dtype)
        T = x.shape[1]
        start = w.shape[0] - 1
        padded = jnp.pad(x, ((0, 0), (start, 0), (0, 0)))
        if segment_ids is None:
            mixed = sum(w[j] * padded[:, start - j : start - j + T] for j in range(w.shape[0]))
        else:  # -1 before the row: never an id, so nothing is read there either
            ids = jnp.pad(segment_ids, ((0, 0), (start, 0)), constant_values=-1)
            mixed = sum(w[j] * jnp.where((ids[:, start - j : start - j + T] == segment_ids)[..., None],
                                         padded[:, start - j : start - j + T], 0.0)
                        for j in range(w.shape[0]))
        return x + mixed + self.bias[...].astype(x.dtype)


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, cfg: EncoderConfig | LMConfig, *, rngs: nnx.Rngs):
        self.dropout = float(cfg.dropout)
        self.ln1 = nnx.LayerNorm(cfg.emb_dim, rngs=rngs)
        self.attn = MultiHeadAttention(
            cfg.num_heads, cfg.emb_dim, max_len=cfg.attention_len, attention=cfg.attention,
            attention_kwargs=_kwargs_dict(cfg.attention_kwargs), fast_exact=cfg.fast_exact,
            rotary=cfg.position == "rotary", num_kv_heads=cfg.num_kv_heads, rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(cfg.emb_dim, rngs=rngs)
        self.mlp_in = nnx.Linear(cfg.emb_dim, cfg.mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(cfg.mlp_dim, cfg.emb_dim, rngs=rngs)

    def __call__(self, x: Float[Array, "B T F"], mask: Mask | None, dropout_key=None,
                 positions: Int[Array, "B T"] | None = None) -> Float[Array, "B T F"]:
        k1 = k2 = k3 = None
        if dropout_key is not None:
            k1, k2, k3 = jax.random.split(dropout_key, 3)
        x = x + _dropout(self.attn(self.ln1(x), mask=mask, positions=positions), self.dropout, k1)
        h = _dropout(nnx.gelu(self.mlp_in(self.ln2(x))), self.dropout, k2)
        return x + _dropout(self.mlp_out(h), self.dropout, k3)


class _Trunk(nnx.Module):
    """Embeddings + blocks + final LayerNorm, shared by the classifier and the LM."""

    def __init__(self, cfg: EncoderConfig | LMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tok = nnx.Embed(cfg.vocab_size, cfg.emb_dim, rngs=rngs)
        if cfg.position == "learned":
            self.pos = nnx.Embed(cfg.attention_len, cfg.emb_dim, rngs=rngs)
        elif cfg.position == "sinusoidal":  # a constant, not a parameter: the optimiser never sees it
            self.pos_table = nnx.Variable(sinusoidal_table(cfg.attention_len, cfg.emb_dim))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.ln_f = nnx.LayerNorm(cfg.emb_dim, rngs=rngs)

    def run(self, x: Float[Array, "B T F"], mask: Mask | None, dropout_key=None,
            positions: Int[Array, "B T"] | None = None) -> Float[Array, "B T F"]:
        """``positions``: each token's position (None = 0 .. T-1 in every row; packed rows:
        the position within its segment), for the table or the rotary angle."""
        T = x.shape[1]
        if self.cfg.position == "learned":
            x = x + (self.pos(jnp.arange(T))[None] if positions is None else self.pos(positions))
        elif self.cfg.position == "sinusoidal":  # "rotary": positions enter in the attention
            x = x + (self.pos_table[...][:T][None] if positions is None else self.pos_table[...][positions])
        keys = [None] * (len(self.blocks) + 1)
        if dropout_key is not None:
            keys = list(jax.random.split(dropout_key, len(self.blocks) + 1))
        x = _dropout(x, self.cfg.dropout, keys[-1])
        for block, key in zip(self.blocks, keys):
            x = block(x, mask, key, positions)
        return self.ln_f(x)


def _short_conv(cfg: EncoderConfig | LMConfig, rngs: nnx.Rngs) -> ShortConv | None:
    """The model's short convolution, or None; each model creates it after all its other
    layers, so that turning it on leaves their initialisation unchanged."""
    return ShortConv(cfg.emb_dim, cfg.short_conv, rngs=rngs) if cfg.short_conv else None


def _apply_conv(conv: ShortConv | None, x, mask, segment_ids=None):
    return x if conv is None else conv(x, mask, segment_ids)


def _check_tokens(tokens, mask, max_len: int, who: str):
    if tokens.ndim != 2:
        raise ValueError(f"{who}: tokens must be [B, L] integers, got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{who}: tokens must be integer ids, got dtype {tokens.dtype}; cast them with .astype(int32)")
    if tokens.shape[1] > max_len:
        raise ValueError(f"{who}: sequence length {tokens.shape[1]} exceeds max_len={max_len}; raise max_len")
    if mask is not None and tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(f"{who}: mask shape {tuple(mask.shape)} must equal tokens shape {tuple(tokens.shape)}")


def _first_outside(ids, limit: int, who: str, what: str, fix: str) -> None:
    """Eagerly (``ids`` concrete): a ``ValueError`` naming the first id outside [0, limit),
    its position and the fix. Traced ids are not checked here (see ``_poison``)."""
    if isinstance(ids, jax.core.Tracer):
        return
    a = np.asarray(ids)
    bad = (a < 0) | (a >= limit)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{who}: {what} {int(a[where])} at position {where} (batch row, index) is outside [0, {limit}) "
            f"({int(bad.sum())} such in all); {fix}"
        )


def _outside_rows(ids, limit: int) -> Bool[Array, " B"]:
    """Rows of ``ids`` ``[B, ...]`` with an id outside [0, limit)."""
    return jnp.any((ids < 0) | (ids >= limit), axis=tuple(range(1, ids.ndim)))


def _poison(out: Float[Array, "B ..."], bad: Bool[Array, " B"]) -> Float[Array, "B ..."]:
    """NaN in every output of the rows ``bad``: what a traced out-of-range id gives."""
    return jnp.where(bad.reshape(bad.shape + (1,) * (out.ndim - 1)), jnp.nan, out)


def _embed_ids(trunk: "_Trunk", tokens: Int[Array, "B L"], who: str):
    """Token embeddings and the rows holding an id outside [0, vocab_size).

    jnp's gather would wrap a negative id and fill (or clamp) one >= vocab_size, which can
    give two different sequences the same logits: eager calls raise instead, and traced calls
    embed a clipped id and return the row's outputs as NaN (``_poison``)."""
    vocab = trunk.cfg.vocab_size
    _first_outside(tokens, vocab, who, "token id",
                   f"token ids must be in [0, vocab_size={vocab}): map the id into the vocabulary, or build the model "
                   f"with a larger vocab_size")
    return trunk.tok(jnp.clip(tokens, 0, vocab - 1)), _outside_rows(tokens, vocab)


class Classifier(nnx.Module):
    """LRA encoder classifier: tokens ``[B, L]`` (+ bool mask, True = real) -> logits ``[B, C]``.

    ``mask=None`` means every token is real, and no key mask is passed to the attention
    (for variants without ``kv_mask`` on tasks without padding).

    Token ids must be in ``[0, vocab_size)``. Called on concrete arrays, an id outside it
    raises a ``ValueError`` naming the id, its position and ``vocab_size``. Under ``jit``
    (traced ids, which cannot be checked before running) every logit of a row holding such an
    id is NaN, so that the row cannot pass for a result (a loss over it is NaN).
    """

    accepts = frozenset({"dropout_key"})  # optional keyword inputs of __call__ (see train.py)

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.trunk = _Trunk(cfg, rngs=rngs)
        if cfg.pool == "cls":
            self.cls = nnx.Param(jax.random.normal(rngs.params(), (cfg.emb_dim,)) * 0.02)
        self.head_hidden = nnx.Linear(cfg.emb_dim, cfg.mlp_dim, rngs=rngs)
        self.head_out = nnx.Linear(cfg.mlp_dim, cfg.num_classes, rngs=rngs)
        self.conv = _short_conv(cfg, rngs)

    def __call__(
        self,
        tokens: Int[Array, "B L"],
        mask: Bool[Array, "B L"] | None = None,
        *,
        dropout_key=None,
    ) -> Float[Array, "B C"]:
        cfg = self.cfg
        _check_tokens(tokens, mask, cfg.max_len, "Classifier")
        x, bad = _embed_ids(self.trunk, tokens, "Classifier")
        x = _apply_conv(self.conv, x, mask)  # on the tokens' embeddings, before the CLS vector
        B = x.shape[0]
        kv_mask = mask
        if cfg.pool == "cls":
            x = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(x.dtype), (B, 1, cfg.emb_dim)), x], axis=1)
            if mask is not None:
                kv_mask = jnp.concatenate([jnp.ones((B, 1), bool), mask], axis=1)
        h = self.trunk.run(x, Mask(kv_mask=kv_mask) if kv_mask is not None else None, dropout_key)
        if cfg.pool == "cls":
            pooled = h[:, 0]
        elif mask is None:
            pooled = h.mean(axis=1)
        else:
            w = mask.astype(h.dtype)[..., None]
            pooled = (h * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
        return self.head_out(nnx.relu(self.head_hidden(_poison(pooled, bad))))


class CausalLM(nnx.Module):
    """Causal language model: tokens ``[B, L]`` -> next-token logits ``[B, L, V]``.

    The attention gets ``Mask(causal=True, kv_mask=mask)``; ``mask=None`` passes no key mask.
    ``segment_ids`` ``[B, L]`` (packed rows, sorted ids): attention within a segment only,
    positions and the short convolution restarting at each segment (module docstring).

    Token ids must be in ``[0, vocab_size)`` and ``positions`` in ``[0, L)``. Called on
    concrete arrays, a value outside raises a ``ValueError`` naming it, its place and the
    bound. Under ``jit`` (traced) every logit of a row holding one is NaN, so that the row
    cannot pass for a result (a loss over it is NaN).
    """

    accepts = frozenset({"dropout_key", "positions", "segment_ids"})  # optional keyword inputs (see train.py)

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.trunk = _Trunk(cfg, rngs=rngs)
        self.head = nnx.Linear(cfg.emb_dim, cfg.num_classes, rngs=rngs)
        self.conv = _short_conv(cfg, rngs)

    def __call__(
        self,
        tokens: Int[Array, "B L"],
        mask: Bool[Array, "B L"] | None = None,
        *,
        dropout_key=None,
        positions: Int[Array, "B K"] | None = None,
        segment_ids: Int[Array, "B L"] | None = None,
    ) -> Float[Array, "B L V"] | Float[Array, "B K V"]:
        """Next-token logits at every position, or only at ``positions`` (per row): a task
        scored at a few positions per sequence (MQAR: P of L) then pays the vocabulary head
        and its softmax there only, not at all L. ``segment_ids``: packed rows (class docstring)."""
        _check_tokens(tokens, mask, self.cfg.max_len, "CausalLM")
        x, bad = _embed_ids(self.trunk, tokens, "CausalLM")
        if segment_ids is None:
            attn_mask, within = Mask(causal=True, kv_mask=mask), None
        else:
            segment_ids = jnp.asarray(segment_ids)
            if tuple(segment_ids.shape) != tuple(tokens.shape) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
                raise ValueError(f"CausalLM: segment_ids must be integers of the tokens' shape {tuple(tokens.shape)}, "
                                 f"got {segment_ids.dtype}{tuple(segment_ids.shape)}; make packed rows with "
                                 "tasks.packing.pack")
            attn_mask = Mask(causal=True, kv_mask=mask, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
            within = segment_positions(segment_ids)
        x = _apply_conv(self.conv, x, mask, segment_ids)
        h = self.trunk.run(x, attn_mask, dropout_key, within)
        if positions is not None:
            L = tokens.shape[1]
            if positions.ndim != 2 or positions.shape[0] != tokens.shape[0]:
                raise ValueError(f"CausalLM: positions must be [B, K] with B={tokens.shape[0]}, "
                                 f"got shape {tuple(positions.shape)}")
            _first_outside(positions, L, "CausalLM", "position",
                           f"positions index the {L} tokens of a row: use values in [0, {L})")
            bad = bad | _outside_rows(positions, L)
            h = jnp.take_along_axis(h, jnp.clip(positions, 0, L - 1)[..., None].astype(jnp.int32), axis=1)
        return self.head(_poison(h, bad))

    # decoding: prefill the prompt once, then one compiled lax.scan over the new tokens

    def generate(
        self,
        prompt: Int[Array, "B P"],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        rng: jax.Array | None = None,
        *,
        mask: Bool[Array, "B P"] | None = None,
    ) -> Int[Array, "B P+N"]:
        """The prompt followed by ``max_new_tokens`` generated tokens, ``[B, P + N]``.

        Each new token is drawn from the next-token distribution given everything before it:
        ``temperature=0`` takes the argmax (greedy); otherwise ``softmax(logits / temperature)``
        restricted to the ``top_k`` most likely tokens (None: all), with ``rng`` (a
        ``jax.random`` key, required then). ``mask`` marks the prompt's real tokens (left
        padding of a batch of prompts); generated tokens are all real.

        The attention runs its decoding state API (``init_state`` with ``max_len = P + N``,
        ``prefill`` of the prompt, one ``step`` per token, capability ``decode``): the whole
        generation is one jitted program, a ``lax.scan`` over the N - 1 steps, compiled once per
        (prompt shape, N, temperature, top_k), never per token. The output equals running the
        model on the growing sequence and taking its last logits (tests/test_generate.py).
        """
        cfg = self.cfg
        spec = get_spec(cfg.attention)
        if not spec.capabilities.decode:
            raise CapabilityError(cfg.attention, "generation (the decoding state API)", "decode")
        prompt = jnp.asarray(prompt)
        if mask is not None:
            mask = jnp.asarray(mask, bool)
        _check_tokens(prompt, mask, cfg.max_len, "CausalLM.generate")
        check_positive_int("CausalLM.generate", "max_new_tokens", max_new_tokens)
        total = prompt.shape[1] + int(max_new_tokens)
        check_config("CausalLM.generate", total <= cfg.max_len,
                     f"prompt of {prompt.shape[1]} + {max_new_tokens} new tokens exceeds max_len={cfg.max_len}; "
                     f"generate at most {cfg.max_len - prompt.shape[1]} tokens or build with max_len >= {total}")
        ok_t = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature >= 0
        check_config("CausalLM.generate", ok_t and np.isfinite(temperature),
                     f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None:
            check_positive_int("CausalLM.generate", "top_k", top_k)
        if temperature > 0 and rng is None:
            raise ValueError("CausalLM.generate: sampling (temperature > 0) needs rng=jax.random.key(seed)")
        _first_outside(prompt, cfg.vocab_size, "CausalLM.generate", "token id",
                       f"token ids must be in [0, vocab_size={cfg.vocab_size})")
        rng = jax.random.key(0) if rng is None else rng
        graphdef, state = nnx.split(self)
        return _generate_jit(graphdef, state, prompt, mask, rng, int(max_new_tokens), float(temperature),
                             None if top_k is None else int(top_k))


# ---------------------------------------------------------------------------- decoding
#
# The LM's layers one token at a time, over the attention's decoding state (``Attention.
# init_state / prefill / step``). Each function mirrors the forward pass it decodes: the
# same projections, rotary angle of the token's position, position embedding, short
# convolution over the K - 1 previous embeddings, blocks, final norm and head.

_GENERATE_TRACES = {"count": 0}  # incremented when generate's program is traced (tests count compiles)


def _mha_prefill(mha: MultiHeadAttention, x, mask: Mask, state):
    q, k, v = mha.qkv(x)
    if mha.rotary:
        q, k = rotate(q, jnp.arange(q.shape[1])), rotate(k, jnp.arange(k.shape[1]))
    out, state = mha.core.prefill(q, k, v, state, mask=mask)
    return mha.out(out), state


def _mha_step(mha: MultiHeadAttention, x_t, state):
    q, k, v = mha.qkv(x_t)
    if mha.rotary:
        where = state.position[None]
        q, k = rotate(q, where), rotate(k, where)
    out, state = mha.core.step(q, k, v, state)
    return mha.out(out), state


def _block_decode(block: Block, x, attend):
    """``Block.__call__`` without dropout, the attention given as ``attend(h) -> (out, state)``."""
    a, state = attend(block.ln1(x))
    x = x + a
    return x + block.mlp_out(nnx.gelu(block.mlp_in(block.ln2(x)))), state


def _positions(trunk: _Trunk, x, positions):
    if trunk.cfg.position == "learned":
        return x + trunk.pos(positions)[None]
    if trunk.cfg.position == "sinusoidal":
        return x + trunk.pos_table[...][positions][None]
    return x  # rotary: in the attention


def _conv_tail(x, mask, kernel: int):
    """The K - 1 last (masked) embeddings the short convolution reads next, zeros before the start."""
    if mask is not None:
        x = jnp.where(mask[..., None], x, 0.0).astype(x.dtype)
    keep = kernel - 1
    x = jnp.pad(x, ((0, 0), (keep, 0), (0, 0)))
    return x[:, x.shape[1] - keep:]


def _conv_step(conv: ShortConv, x_t, tail):
    """``ShortConv`` at one position: (y_t [B, 1, F], the new tail)."""
    w = conv.kernel[...].astype(x_t.dtype)
    window = jnp.concatenate([tail, x_t], axis=1)  # x_{t-K+1} .. x_t
    K = w.shape[0]
    mixed = sum(w[j] * window[:, K - 1 - j : K - j] for j in range(K))
    return x_t + mixed + conv.bias[...].astype(x_t.dtype), window[:, 1:]


def _lm_prefill(lm: "CausalLM", tokens, mask, total: int):
    """Logits at the prompt's last position and the decoding states (attention, convolution)."""
    x, bad = _embed_ids(lm.trunk, tokens, "CausalLM.generate")
    tail = None if lm.conv is None else _conv_tail(x, mask, lm.conv.kernel.shape[0])
    x = _apply_conv(lm.conv, x, mask)
    x = _positions(lm.trunk, x, jnp.arange(x.shape[1]))
    attn_mask = Mask(causal=True, kv_mask=mask)
    states = []
    for block in lm.trunk.blocks:
        empty = block.attn.core.init_state(x.shape[0], max_len=total, dtype=x.dtype)
        x, s = _block_decode(block, x, lambda h, b=block, e=empty: _mha_prefill(b.attn, h, attn_mask, e))
        states.append(s)
    logits = lm.head(_poison(lm.trunk.ln_f(x[:, -1:]), bad))[:, 0]
    return logits, (states, tail, bad)


def _lm_step(lm: "CausalLM", token, carry):
    """Logits after one more token [B], and the carried states."""
    states, tail, bad = carry
    x, _ = _embed_ids(lm.trunk, token[:, None], "CausalLM.generate")
    if lm.conv is not None:
        x, tail = _conv_step(lm.conv, x, tail)
    x = _positions(lm.trunk, x, states[0].position[None])
    new = []
    for block, s in zip(lm.trunk.blocks, states):
        x, s = _block_decode(block, x, lambda h, b=block, s=s: _mha_step(b.attn, h, s))
        new.append(s)
    logits = lm.head(_poison(lm.trunk.ln_f(x), bad))[:, 0]
    return logits, (new, tail, bad)


def _sample(logits: Float[Array, "B V"], temperature: float, top_k: int | None, key) -> Int[Array, " B"]:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = jax.lax.top_k(z, top_k)[0][:, -1:]
        z = jnp.where(z >= kth, z, -jnp.inf)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


def _generate(graphdef, state, prompt, mask, rng, max_new_tokens: int, temperature: float, top_k: int | None):
    _GENERATE_TRACES["count"] += 1
    lm = nnx.merge(graphdef, state, copy=True)
    total = prompt.shape[1] + max_new_tokens
    logits, carry = _lm_prefill(lm, prompt, mask, total)
    keys = jax.random.split(rng, max_new_tokens)
    first = _sample(logits, temperature, top_k, keys[0])

    def one(c, key):
        token, carry = c
        logits, carry = _lm_step(lm, token, carry)
        nxt = _sample(logits, temperature, top_k, key)
        return (nxt, carry), nxt

    _, rest = jax.lax.scan(one, (first, carry), keys[1:])
    new = jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)
    return jnp.concatenate([prompt.astype(jnp.int32), new], axis=1)


_generate_jit = jax.jit(_generate, static_argnums=(0, 5, 6, 7))
