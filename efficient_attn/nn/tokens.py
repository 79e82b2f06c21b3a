"""The models' token inputs: shape and dtype checks (``_check_tokens``), and ids outside their
range.

Called on concrete arrays, an id outside ``[0, limit)`` raises a ``ValueError`` naming it, its
place and the bound (``_first_outside``). Under ``jit`` it cannot raise: the rows holding one
(``_outside_rows``) get NaN in every output (``_poison``), so that they cannot pass for a
result. ``_embed_ids`` embeds token ids that way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.nn.trunk import _Trunk


def _check_tokens(tokens, mask, max_len: int, who: str):
    if tokens.ndim != 2:
        raise ValueError(f"{who}: tokens must be [B, L] integers, got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{who}: tokens must be integer ids, got dtype {tokens.dtype}; cast them with .astype(int32)")
    if tokens.shape[1] > max_len:
        raise ValueError(f"{who}: sequence length {tokens.shape[1]} exceeds max_len={max_len}; raise max_len")
    if mask is not None and tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(f"{who}: mask shape {tuple(mask.shape)} must equal tokens shape {tuple(tokens.shape)}")


def _first_outside(ids, limit: int, who: str, what: str, fix: str) -> None:
    """Eagerly (``ids`` concrete): a ``ValueError`` naming the first id outside [0, limit),
    its position and the fix. Traced ids are not checked here (see ``_poison``)."""
    if isinstance(ids, jax.core.Tracer):
        return
    a = np.asarray(ids)
    bad = (a < 0) | (a >= limit)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{who}: {what} {int(a[where])} at position {where} (batch row, index) is outside [0, {limit}) "
            f"({int(bad.sum())} such in all); {fix}"
        )


def _outside_rows(ids, limit: int) -> Bool[Array, " B"]:
    """Rows of ``ids`` ``[B, ...]`` with an id outside [0, limit)."""
    return jnp.any((ids < 0) | (ids >= limit), axis=tuple(range(1, ids.ndim)))


def _poison(out: Float[Array, "B ..."], bad: Bool[Array, " B"]) -> Float[Array, "B ..."]:
    """NaN in every output of the rows ``bad``: what a traced out-of-range id gives."""
    return jnp.where(bad.reshape(bad.shape + (1,) * (out.ndim - 1)), jnp.nan, out)


def _embed_ids(trunk: "_Trunk", tokens: Int[Array, "B L"], who: str):
    """Token embeddings and the rows holding an id outside [0, vocab_size).

    jnp's gather would wrap a negative id and fill (or clamp) one >= vocab_size, which can
    give two different sequences the same logits: eager calls raise instead, and traced calls
    embed a clipped id and return the row's outputs as NaN (``_poison``)."""
    vocab = trunk.cfg.vocab_size
    _first_outside(tokens, vocab, who, "token id",
                   f"token ids must be in [0, vocab_size={vocab}): map the id into the vocabulary, or build the model "
                   f"with a larger vocab_size")
    return trunk.tok(jnp.clip(tokens, 0, vocab - 1)), _outside_rows(tokens, vocab)
