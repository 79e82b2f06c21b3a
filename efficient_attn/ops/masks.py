"""Visibility of (query, key) pairs implied by a ``Mask``, and the rules for non-finite inputs.

``dense_visibility`` materialises the ``[B, H|1, T, S]`` boolean matrix: only quadratic
variants ("full", the learned ones) may call it. Subquadratic engines build visibility per
block from ``causal_block``/``kv_mask`` slices instead.

Non-finite inputs (every engine follows these rules, so that no NaN or Inf ever comes out as
a plausible finite number, and no masked or future position ever matters):

- "Nothing visible" is a structural fact, known from the masks alone; it is never inferred
  from a normaliser being 0 (a NaN normaliser is not "nothing visible"). A query that sees
  no key gets exact zeros; a query that sees keys gets whatever the arithmetic gives,
  NaN included (a row whose visible logits are all -inf is 0/0 = NaN, as in ``full``).
- Masked and future positions are removed with ``where`` BEFORE any product (0 * NaN is
  NaN): logits by ``where(visible, s, -inf)``, keys and values that no query may see are
  replaced by zeros (``hide_keys``), so neither the forward nor the backward pass reads them.
- Values enter products through ``split_nonfinite``: a value row with a NaN or Inf entry
  is replaced by zeros in the product, and the query rows that SEE that key get NaN instead
  (engines poison the key's logits, or its features). So a non-finite value poisons exactly
  the rows that attend to it (all of their components: an Inf value gives NaN, not Inf),
  while a row that cannot see it (a causal past row in the same block, whose weight on it
  is an exact 0) is unchanged.
- Recurrences (``ops.gated_linear``, ``ops.delta_rule``) go through ``split_nonfinite_steps``:
  a token whose key, value, write strength or gate is not finite is an identity step in the
  chunked products, and every output from that token on (its batch row and head) is NaN.
  That is what the token-by-token recurrence gives (the state is NaN from then on), while an
  earlier output in the same chunk, whose weight on the token is an exact 0, is unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from efficient_attn.core import Mask


def causal_visibility(T: int, S: int, q_offset=0, k_offset=0) -> Bool[Array, "T S"]:
    """``[T, S]`` True where key position ``k_offset + j <= q_offset + i``."""
    qi = q_offset + jnp.arange(T)[:, None]
    kj = k_offset + jnp.arange(S)[None, :]
    return kj <= qi


def dense_visibility(mask: Mask | None, B: int, T: int, S: int) -> Bool[Array, "B Hm T S"] | None:
    """The full boolean visibility matrix (None when everything is visible). O(T S) memory.

    causal, kv_mask, dense, and packed segments (a query sees keys of its own segment only)."""
    if mask is None:
        return None
    vis = None

    def _and(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if mask.causal:
        vis = _and(vis, causal_visibility(T, S)[None, None])
    if mask.kv_mask is not None:
        vis = _and(vis, mask.kv_mask[:, None, None, :])
    if mask.dense is not None:
        vis = _and(vis, mask.dense)
    if mask.q_segment_ids is not None and mask.kv_segment_ids is not None:  # packed: pairs of one segment
        vis = _and(vis, (mask.q_segment_ids[:, :, None] == mask.kv_segment_ids[:, None, :])[:, None])
    if vis is None:
        return None
    return jnp.broadcast_to(vis, (B,) + vis.shape[1:]) if vis.shape[0] == 1 else vis


def split_nonfinite(v: Float[Array, "B S H E"]) -> tuple[Float[Array, "B S H E"], Bool[Array, "B S H"]]:
    """``(v with every non-finite row zeroed, which rows were non-finite)``.

    The zeroed copy goes into products; the flags go to the logits or features of those keys
    (NaN there), so that only the queries that see a bad value are poisoned by it.
    """
    ok = jnp.isfinite(v)
    bad = jnp.logical_not(jnp.all(ok, axis=-1))
    return jnp.where(bad[..., None], jnp.zeros((), v.dtype), v), bad


def poison_keys(k: Float[Array, "B S H D"], bad: Bool[Array, "B S H"]) -> Float[Array, "B S H D"]:
    """``k`` with NaN rows where ``bad``: every logit of such a key is NaN, so each query that
    sees it (and only those: invisible logits are replaced by -inf) is NaN."""
    return jnp.where(bad[..., None], jnp.asarray(jnp.nan, k.dtype), k)


def poison_nonfinite_rows(x: Float[Array, "B N H D"]) -> Float[Array, "B N H D"]:
    """Rows of ``x`` with any NaN or Inf entry become all NaN. For feature maps that send a
    non-finite input to a finite feature (elu(-inf) + 1 = 0, relu(-inf) = 0), which would
    otherwise turn into a plausible 0 output or a silently dropped key."""
    bad = jnp.logical_not(jnp.all(jnp.isfinite(x), axis=-1, keepdims=True))
    return jnp.where(bad, jnp.asarray(jnp.nan, x.dtype), x)


def split_nonfinite_steps(
    *tokens: Float[Array, "B T H ..."], gates: tuple[Float[Array, "B T H ..."], ...] = ()
) -> tuple[tuple[Float[Array, "B T H ..."], ...], tuple[Float[Array, "B T H ..."], ...], Bool[Array, "B T H"]]:
    """``(tokens zeroed at bad steps, gates zeroed at bad steps, poisoned)`` for a recurrence.

    A step (batch, position, head) is bad when any of its ``tokens`` entries (keys, values,
    write strengths) is NaN or +-Inf, or a log gate is NaN or +Inf (a log gate of -inf is a
    forget gate of exactly 0: allowed). Zeroed by ``where``, a bad step writes nothing and
    forgets nothing in the chunked products, so it cannot reach an earlier output through
    a zero weight. ``poisoned`` [B, T, H] is True from the first bad step on: the engine sets
    those outputs to NaN (``poison_steps``), as the state of the recurrence would be.
    """
    def bad_of(x, ok):
        return jnp.logical_not(jnp.all(ok, axis=tuple(range(3, x.ndim)))) if x.ndim > 3 else jnp.logical_not(ok)

    bad = None
    for x in tokens:
        b = bad_of(x, jnp.isfinite(x))
        bad = b if bad is None else bad | b
    for g in gates:
        b = bad_of(g, jnp.logical_not(jnp.isnan(g) | (g == jnp.inf)))
        bad = b if bad is None else bad | b
    zero = lambda x: jnp.where(bad.reshape(bad.shape + (1,) * (x.ndim - 3)), jnp.zeros((), x.dtype), x)  # noqa: E731
    poisoned = lax.cummax(bad.astype(jnp.int32), axis=1) > 0
    return tuple(zero(x) for x in tokens), tuple(zero(g) for g in gates), poisoned


def poison_steps(out: Float[Array, "B T H E"], poisoned: Bool[Array, "B T H"]) -> Float[Array, "B T H E"]:
    """NaN at every output of a poisoned step (``split_nonfinite_steps``)."""
    return jnp.where(poisoned[..., None], jnp.asarray(jnp.nan, out.dtype), out)


def hide_keys(x: Float[Array, "B S H E"], keep: Bool[Array, "B S"] | None) -> Float[Array, "B S H E"]:
    """Zero the rows of ``x`` at keys no query may see (``keep`` False): by ``where``, so NaN or
    Inf there reaches neither the forward products nor the gradients (a double where)."""
    if keep is None:
        return x
    return jnp.where(keep[:, :, None, None], x, jnp.zeros((), x.dtype))


def masked_softmax(logits, visible, axis: int = -1):
    """Softmax over ``axis`` that gives all-zero rows where nothing is visible (never NaN there).

    ``visible`` is a boolean broadcastable to ``logits`` or None (all visible). Whether a row
    sees anything is read from ``visible``, not from the normaliser: a row with a NaN logit
    among its visible ones is NaN (not zeros), and invisible logits never matter, whatever
    their value.
    """
    if visible is None:
        return jax.nn.softmax(logits, axis=axis)
    neg = jnp.finfo(logits.dtype).min
    z = jnp.where(visible, logits, neg)
    z = z - jnp.max(z, axis=axis, keepdims=True)
    e = jnp.where(visible, jnp.exp(z), 0.0)
    denom = jnp.sum(e, axis=axis, keepdims=True)
    seen = jnp.any(visible, axis=axis, keepdims=True)
    return e / jnp.where(seen, denom, 1.0)
