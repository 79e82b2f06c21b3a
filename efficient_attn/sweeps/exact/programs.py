"""What the kernel benchmark runs: the three exact implementations, their forward+backward,
the inputs, and the matmul FLOPs each pass does.

The benchmark names ``full`` and ``blockwise`` on purpose: it is about those two kernels
(against ``jax.nn.dot_product_attention``), not about the registry.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import efficient_attn as ea
from efficient_attn.ops.online_softmax import blockwise_attention
from efficient_attn.variants.full import full_attention

__all__ = ["impls", "fwd_bwd", "program", "with_gradients", "checked_program", "inputs", "attention_flops",
           "matmul_program"]

Fn = Callable[[Array, Array, Array], Array]


def impls(causal: bool) -> dict[str, Fn]:
    """The implementations compared, each ``(q, k, v) -> out`` on ``[B, N, H, D]`` arrays."""
    mask = ea.Mask(causal=causal)
    return {
        "jax.nn.dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal),
        "full": lambda q, k, v: full_attention(q, k, v, mask),
        "blockwise": lambda q, k, v: blockwise_attention(q, k, v, causal=causal),
    }


def fwd_bwd(f: Fn) -> Callable:
    """The gradients of ``sum(f(q, k, v))`` with respect to q, k and v: a forward and a backward."""

    def loss(q, k, v):
        return jnp.sum(f(q, k, v))

    return jax.grad(loss, argnums=(0, 1, 2))


def program(name: str, pass_name: str, causal: bool = False) -> Callable:
    """The function timed for ``name`` in pass ``"fwd"`` or ``"fwd_bwd"``."""
    f = impls(causal)[name]
    return f if pass_name == "fwd" else fwd_bwd(f)


def with_gradients(f: Fn) -> Callable:
    """``(q, k, v) -> (out, dq, dk, dv)``: the output and the gradients of ``sum(out)``, one
    forward and one backward (what ``fwd_bwd`` computes, the output kept so it can be checked)."""

    def both(q, k, v):
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(jnp.ones_like(out)))

    return both


def checked_program(f: Fn, pass_name: str) -> Callable:
    """The function a peers row times and checks for ``f``: its output (``"fwd"``), or its
    output and gradients (``"fwd_bwd"``); every implementation of the row gets the same one."""
    return f if pass_name == "fwd" else with_gradients(f)


def inputs(n: int, b: int, h: int, d: int) -> list[Float[Array, "B N H D"]]:
    """q, k, v: standard normal float32 from a fixed key (every row measures the same data)."""
    ks = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(kk, (b, n, h, d), jnp.float32) for kk in ks]


def attention_flops(n: int, b: int, h: int, d: int, causal: bool = False, backward: bool = False) -> float:
    """Matmul FLOPs of exact attention: 2 matmuls of 2 n^2 d forward; forward+backward 3.5x
    that (the backward's 5 matmuls, the recomputed scores included)."""
    f = 4.0 * b * h * n * n * d
    if backward:
        f *= 3.5
    return f / 2 if causal else f


def matmul_program(n: int) -> tuple[Callable, list[Float[Array, "n n"]], float]:
    """The machine's yardstick: an f32 ``n x n @ n x n`` product, its inputs and its FLOPs."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    return jnp.matmul, [a, b], 2.0 * n**3
