"""Shared helpers of the conformance suite: every registered variant, plugins included."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

import efficient_attn as ea
from efficient_attn.registry import load_plugin
from pathlib import Path

load_plugin(Path(__file__).with_name("plugin_variant.py"))  # the README's style: its own __call__
load_plugin(Path(__file__).with_name("plugin_declared.py"))  # attend() only, declarations, no super().__init__

VARIANTS = ea.list_variants()

# Small sizes so the whole suite stays fast on 2 cores.
B, H, D = 2, 2, 16
MAX_LEN = 128


@functools.lru_cache(maxsize=None)
def built(name: str, seed: int = 0):
    """One module per (variant, seed), shared by every test of the session."""
    return ea.build(name, num_heads=H, head_dim=D, max_len=MAX_LEN, rngs=nnx.Rngs(seed))


def as_claimed(name: str, mask):
    """The mask a test means, for a variant that is causal by construction (a recurrence:
    ``capabilities.bidirectional=False``): the same request with ``causal=True``."""
    if ea.get_spec(name).capabilities.bidirectional:
        return mask
    if mask is None:
        return ea.Mask(causal=True)
    return mask if mask.causal else dataclasses.replace(mask, causal=True)


def pure(module):
    """A pure function of (q, k, v, mask) over a snapshot of the module's state (jit/vmap/grad
    safe); causal-only variants get ``causal=True`` added (``as_claimed``)."""
    graphdef, state = nnx.split(module)
    name = type(module).variant_name

    def f(q, k, v, mask=None):
        return nnx.merge(graphdef, state, copy=True)(q, k, v, mask=as_claimed(name, mask))

    return f


@functools.lru_cache(maxsize=None)
def jitted(name: str, seed: int = 0):
    return jax.jit(pure(built(name, seed)))


def qkv(T: int, S: int | None = None, *, seed: int = 0, dtype=jnp.float32, batch: int = B):
    S = T if S is None else S
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (batch, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, S, H, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, S, H, D), jnp.float32).astype(dtype)
    return q, k, v


def caps(name):
    return ea.get_spec(name).capabilities

