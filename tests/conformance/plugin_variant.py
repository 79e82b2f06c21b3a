"""A variant defined outside the package, as a user would write it: registered from a test file.

The conformance suite must pick it up with no extra code (it is imported by conftest.py).
It is plain softmax attention written against the public API only, so it claims exactness.
"""

import dataclasses

import jax
import jax.numpy as jnp

import efficient_attn as ea


@dataclasses.dataclass(frozen=True)
class PluginConfig:
    temperature: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"plugin_softmax: temperature must be > 0, got {self.temperature}")


@ea.register("plugin_softmax", config=PluginConfig, family="plugin", citation="conformance test plugin")
class PluginSoftmax(ea.Attention):
    """Softmax attention from a user file (no causal, kv_mask only)."""

    capabilities = ea.Capabilities(causal=False, cross=True, kv_mask=True, exact=True, time="O(N^2)", memory="O(N^2)")

    def __call__(self, q, k, v, *, mask=None):
        s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
        s = s / (self.config.temperature * jnp.sqrt(jnp.float32(q.shape[-1])))
        if mask is not None and mask.kv_mask is not None:
            vis = mask.kv_mask[:, None, None, :]
            s = jnp.where(vis, s, -jnp.inf)
            w = jnp.where(vis, jax.nn.softmax(jnp.where(vis, s, -1e30), axis=-1), 0.0)
        else:
            w = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("bhts,bshd->bthd", w, v.astype(jnp.float32))
