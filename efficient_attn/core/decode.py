"""The decoding state: ``DecodeState`` (a pytree of fixed size that a variant carries from one
decoded token to the next), and the check of ``prefill`` and ``step`` that is not a method of
``Attention`` (``_check_value_width``: the state holds values of width ``head_dim``).

The API itself (``init_state``, ``prefill``, ``step``) stays on ``Attention``
(``core/attention.py``), which validates and calls a variant's ``_init_decode_state``,
``_prefill`` and ``_step``; its state check (``Attention._check_state``) refuses a state whose
static fields name another variant, configuration, batch or size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jaxtyping import Array, Int

from efficient_attn.core.dims import Dims
from efficient_attn.core.validation import _fmt_shape


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["position", "data"],
    meta_fields=["variant", "config", "dims", "batch", "max_len", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What a variant carries from one decoded token to the next (a pytree: jit/scan it).

    position: ``[]`` int32, the number of tokens consumed so far (the next token's position).
    data:     the variant's own arrays (a KV cache, a ring buffer of its window, a recurrent
              state); their size is fixed at ``init_state``, whatever the position.
    The other fields are static and say whose state it is: ``variant``, its ``config`` and
    ``dims``, the ``batch`` size, ``max_len`` (the positions the state can hold) and the
    storage ``dtype`` of cached keys and values. ``step`` and ``prefill`` refuse a state whose
    static fields differ from what the module would make (another variant, configuration,
    batch or size).
    """

    variant: str
    config: Any
    dims: Dims
    batch: int
    max_len: int
    dtype: str
    position: Int[Array, ""]
    data: Any


def _check_value_width(name: str, v, dims: Dims) -> None:
    if v.shape[3] != dims.head_dim:
        raise ValueError(
            f"{name}: decoding states hold values of width head_dim={dims.head_dim}, got v of shape "
            f"{_fmt_shape(v)}; project values to head_dim"
        )
