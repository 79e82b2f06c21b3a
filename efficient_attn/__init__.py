"""efficient-attn: efficient attention variants behind one interface, in JAX / Flax NNX.

Public API (nothing else is public):

    Attention, Mask, Capabilities, Dims          the interface (efficient_attn.core)
    CapabilityError, check_config,               errors and config checks for variants and plugins
    check_positive_int
    register, build, get_spec, list_variants,    the registry (efficient_attn.registry)
    Budget
    attention_fn                                 adapter for flax.nnx.MultiHeadAttention

Layout: q [B, T, H, D], k and v [B, S, H, D], output [B, T, H, D].
"""

from efficient_attn.core import (
    Attention,
    Capabilities,
    CapabilityError,
    Dims,
    Mask,
    check_config,
    check_positive_int,
)
from efficient_attn.registry import Budget, build, get_spec, list_variants, register
from efficient_attn.adapters import attention_fn

__all__ = [
    "Attention",
    "Mask",
    "Capabilities",
    "Dims",
    "CapabilityError",
    "check_config",
    "check_positive_int",
    "Budget",
    "register",
    "build",
    "get_spec",
    "list_variants",
    "attention_fn",
]
__version__ = "0.1.0"
