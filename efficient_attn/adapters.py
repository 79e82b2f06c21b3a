"""``attention_fn``: plug a registered, parameter-free variant into ``flax.nnx.MultiHeadAttention``.

    nnx.MultiHeadAttention(..., attention_fn=ea.attention_fn("local", window=128))

Flax passes ``query [B, T, H, D]``, ``key``/``value [B, S, H, D]``, an optional boolean
``mask`` broadcastable to ``[B, H, T, S]`` and ``is_causal``. A mask of shape
``[B, 1, 1, S]`` (what ``nnx.make_attention_mask`` gives for key padding) is passed to the
variant as ``Mask.kv_mask``; any other mask is passed as ``Mask.dense`` and therefore only
works with variants that declare ``dense_mask``. Dropout on attention weights is not
supported (weights are not materialised by most variants): a nonzero ``dropout_rate`` with
``deterministic=False`` raises.

Grouped-query attention: flax's ``MultiHeadAttention(num_kv_heads=G)`` (Flax >= 0.12)
projects keys and values to G < H heads and hands them over as ``[B, S, G, D]``; the variant is
then built with ``num_kv_heads=G`` and reads kv head h // (H / G) natively (k and v are not
repeated). A variant without the ``gqa`` capability refuses with a ``CapabilityError`` naming
the variants that can; build flax's module with ``num_kv_heads=num_heads`` (the default) to
use it.

Flax's decode mode (``nnx.MultiHeadAttention(decode=True)`` after ``init_cache``): each call
brings one query, the whole key/value cache ``[B, L, H, D]`` and the mask ``[B, 1, 1, L]``
of the slots written so far (``arange(L) <= cache_index``, and any mask of the caller). Flax
keeps the cache; the adapter only has to place the query. A one-query call over a longer,
masked key sequence is therefore read as a decoding step at position p = the last slot the
mask shows (the cache index): the variant's causal output at p over the visible keys 0..p.
That is what makes a window relative to the cache index, not to the slot: ``local`` attends
to p - w .. p, ``streaming`` to its sinks and the w slots before p, a recurrence runs over
0..p. It is computed as the variant's causal forward over the cache with the query placed at
row p (O(the forward at length L) per token; the variant's own decoding state, O(1) or O(p)
per token, needs ``Attention.init_state/step`` instead of flax's cache). Exact variants
(softmax attention, where a position changes nothing) take the call as it is, one query over
the visible keys. A variant that cannot decode (``capabilities.decode`` False) and cannot do
cross attention is refused with a ``CapabilityError``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.core import CapabilityError, Mask
from efficient_attn.registry import build, get_spec, make_config


def _key_mask(mask, B: int, S: int):
    """A ``[B|1, 1, 1, S]`` mask as ``[B, S]`` bool, or None for any other shape."""
    if mask is not None and mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == S:
        kv_mask = mask[:, 0, 0, :].astype(bool)
        return jnp.broadcast_to(kv_mask, (B, S)) if kv_mask.shape[0] != B else kv_mask
    return None


def _decoding_step(module, query, key, value, kv_mask):
    """The causal output of the one query at position p = the last visible key of its row."""
    B, _, H, D = query.shape
    S = key.shape[1]
    p = jnp.max(jnp.where(kv_mask, jnp.arange(S), -1), axis=1)  # [B]; -1: nothing visible
    rows = jnp.arange(B)
    at = jnp.maximum(p, 0)
    q_full = jnp.zeros((B, S, H, D), query.dtype).at[rows, at].set(query[:, 0])
    out = module(q_full, key, value, mask=Mask(causal=True, kv_mask=kv_mask))[rows, at]
    return jnp.where((p >= 0)[:, None, None], out, jnp.zeros((), out.dtype))[:, None]


def attention_fn(name: str, **hyperparameters) -> Callable:
    """A function with ``flax.nnx.dot_product_attention``'s signature that runs variant ``name``."""
    spec = get_spec(name)
    make_config(name, **hyperparameters)  # reject unknown hyperparameters now, not at trace time
    cache: dict[tuple[int, int, int], object] = {}

    def fn(query, key, value, bias=None, mask=None, *, dropout_rate=0.0, deterministic=True,
           is_causal=False, **unused):
        if bias is not None:
            raise ValueError(f"attention_fn({name!r}): an additive bias is not supported; pass a boolean mask")
        if dropout_rate and not deterministic:
            raise ValueError(
                f"attention_fn({name!r}): attention-weight dropout is not supported; "
                "set dropout_rate=0.0 (use dropout on the projections instead)"
            )
        B, T, H, D = query.shape
        S, Hkv = key.shape[1], key.shape[2]
        if value.shape[2] != Hkv or H % Hkv:
            raise ValueError(
                f"attention_fn({name!r}): key and value must have one head count dividing the {H} query heads, "
                f"got key {tuple(key.shape)} and value {tuple(value.shape)}"
            )
        key_ = (H, Hkv, D, max(T, S))
        if key_ not in cache:
            # concrete even when first called inside jit: the module is kept across traces
            with jax.ensure_compile_time_eval():
                module = build(name, num_heads=H, head_dim=D, max_len=max(T, S), rngs=nnx.Rngs(0),
                               num_kv_heads=Hkv, **hyperparameters)
            if nnx.state(module, nnx.Param):
                raise ValueError(
                    f"attention_fn({name!r}): this variant has learned parameters, which a plain "
                    f"function cannot hold; use efficient_attn.nn.MultiHeadAttention(num_heads, in_features, attention={name!r}, ...) instead"
                )
            cache[key_] = module
        module = cache[key_]
        kv_mask = _key_mask(mask, B, S)
        caps = spec.capabilities
        if T == 1 and S > 1 and kv_mask is not None and not is_causal and not caps.exact:
            if caps.decode:
                return _decoding_step(module, query, key, value, kv_mask)
            if not caps.cross:
                raise CapabilityError(name, "flax's decode mode (one query over the key/value cache)", "decode")
        dense = None if mask is None or kv_mask is not None else mask.astype(bool)
        return module(query, key, value, mask=Mask(causal=bool(is_causal), kv_mask=kv_mask, dense=dense))

    fn.__name__ = f"attention_fn_{spec.name}"
    return fn
