"""``ShortConv``: the causal depthwise convolution on the token embeddings (``short_conv``).

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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.core import check_positive_int
from efficient_attn.nn.config import EncoderConfig, LMConfig


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


def _short_conv(cfg: EncoderConfig | LMConfig, rngs: nnx.Rngs) -> ShortConv | None:
    """The model's short convolution, or None; each model creates it after all its other
    layers, so that turning it on leaves their initialisation unchanged."""
    return ShortConv(cfg.emb_dim, cfg.short_conv, rngs=rngs) if cfg.short_conv else None


def _apply_conv(conv: ShortConv | None, x, mask, segment_ids=None):
    return x if conv is None else conv(x, mask, segment_ids)
