"""``MultiHeadAttention``: the projections around any registered attention core; rotary positions.

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

Also here: ``rotate``, the rotary position embedding that ``MultiHeadAttention(rotary=True)``
(the models' ``position="rotary"``) applies to queries and keys before the core, and
``_check_kv_heads``, the grouped-query check the models' configs share.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from efficient_attn.core import Capabilities, Mask, check_config, check_positive_int
from efficient_attn.registry import build, get_spec


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
