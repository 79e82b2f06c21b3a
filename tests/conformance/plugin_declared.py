"""A second user-written variant, in the newer style: it implements ``attend`` only, its
``__init__`` does not call ``super().__init__`` (as Flax NNX modules are often written), and
it declares what the experiments need (budget, pattern setting, exact limit) where it is
registered. Nothing else in the repository names it: the conformance suite, ``efficient-attn
list`` and the cost, accuracy and approximation experiments must all pick it up.
"""

import dataclasses

import jax.numpy as jnp

import efficient_attn as ea


@dataclasses.dataclass(frozen=True)
class BandConfig:
    window: int = 8

    def __post_init__(self):
        ea.check_positive_int("plugin_band", "window", self.window)


@ea.register(
    "plugin_band",
    config=BandConfig,
    citation="conformance test plugin",
    budget=ea.Budget("window", (2, 4, 8, 16), length_like=True),
    pattern_setting={"window": 4},
    exact_limit=lambda n: {"window": n},
)
class PluginBand(ea.Attention):
    """Dense softmax over a band |i - j| <= window (a plugin written against the public API)."""

    capabilities = ea.Capabilities(causal=True, kv_mask=True, time="O(N^2)", memory="O(N^2)")

    def __init__(self, config, dims, *, rngs):
        self.window = config.window  # no super().__init__: build() supplies config and dims

    def attend(self, q, k, v, mask):
        T, S = q.shape[1], k.shape[1]
        i, j = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
        vis = jnp.abs(i - j) <= self.window
        if mask.causal:
            vis = vis & (j <= i)
        vis = vis[None, None]
        if mask.kv_mask is not None:
            vis = vis & mask.kv_mask[:, None, None, :]
        s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) / jnp.sqrt(q.shape[-1])
        s = jnp.where(vis, s, -jnp.inf)
        m = jnp.max(jnp.where(vis, s, -1e30), axis=-1, keepdims=True)
        e = jnp.where(vis, jnp.exp(s - m), 0.0)
        w = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)
        return jnp.einsum("bhts,bshd->bthd", w, v.astype(jnp.float32))
