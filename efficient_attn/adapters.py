"""``attention_fn``: plug a registered, parameter-free variant into ``flax.nnx.MultiHeadAttention``.

    nnx.MultiHeadAttention(..., attention_fn=ea.attention_fn("local", window=128))

Flax passes ``query [B, T, H, D]``, ``key``/``value [B, S, H, D]``, an optional boolean
``mask`` broadcastable to ``[B, H, T, S]`` and ``is_causal``. A mask of shape
``[B, 1, 1, S]`` (what ``nnx.make_attention_mask`` gives for key padding) is passed to the
variant as ``Mask.kv_mask``; any other mask is passed as ``Mask.dense`` and therefore only
works with variants that declare ``dense_mask``. Dropout on attention weights is not
supported (weights are not materialised by most variants): a nonzero ``dropout_rate`` with
``deterministic=False`` raises.
"""

from __future__ import annotations

from typing import Callable

from flax import nnx

from efficient_attn.core import Mask
from efficient_attn.registry import build, get_spec, make_config


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
        S = key.shape[1]
        key_ = (H, D, max(T, S))
        if key_ not in cache:
            module = build(name, num_heads=H, head_dim=D, max_len=max(T, S), rngs=nnx.Rngs(0), **hyperparameters)
            if nnx.state(module, nnx.Param):
                raise ValueError(
                    f"attention_fn({name!r}): this variant has learned parameters, which a plain "
                    f"function cannot hold; use efficient_attn.nn.MultiHeadAttention(num_heads, in_features, attention={name!r}, ...) instead"
                )
            cache[key_] = module
        kv_mask = dense = None
        if mask is not None:
            if mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == S:
                kv_mask = mask[:, 0, 0, :].astype(bool)
                if kv_mask.shape[0] != B:
                    kv_mask = kv_mask.repeat(B, axis=0) if kv_mask.shape[0] == 1 else kv_mask
            else:
                dense = mask.astype(bool)
        return cache[key_](query, key, value, mask=Mask(causal=bool(is_causal), kv_mask=kv_mask, dense=dense))

    fn.__name__ = f"attention_fn_{spec.name}"
    return fn
