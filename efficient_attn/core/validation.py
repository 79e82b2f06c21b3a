"""What the base class checks before and after a variant runs: inputs (``validate_inputs``:
ranks, shapes, dtypes, ``max_len``, mask shapes, the requested features against the variant's
``Capabilities``), the mask (``normalise_mask``), numpy and list inputs (``_as_array``) and the
result of ``attend`` (``_check_output``).

Every refusal is a ``ValueError`` / ``TypeError`` (or a ``CapabilityError``) naming the variant,
what was given and the fix.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core.capabilities import Capabilities, CapabilityError
from efficient_attn.core.dims import Dims
from efficient_attn.core.mask import MASK_ARRAY_FIELDS, Mask


def _fmt_shape(x) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


def validate_inputs(name: str, caps: Capabilities, dims: Dims, q, k, v, mask: Mask | None) -> None:
    """Raise a clear ``ValueError``/``TypeError`` for anything the variant cannot honour.

    Checked: ranks, batch/head/width agreement, floating dtypes, ``max_len``, mask shapes and
    dtypes, and the requested features against ``caps``.
    """
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name}: {arg} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            want = "[B, T, H, D]" if arg == "q" else "[B, S, H, D]"
            raise ValueError(
                f"{name}: {arg} must have rank 4 {want}, got shape {_fmt_shape(x)}; "
                "add a batch or head axis with x[None] or x[:, :, None]"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"{name}: {arg} must be a floating array (float32, bfloat16, float16), "
                f"got {x.dtype}; cast with {arg}.astype(jnp.float32)"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
            "cast them to one dtype"
        )
    B, T, H, D = q.shape
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if 0 in x.shape:
            raise ValueError(
                f"{name}: {arg} has an empty axis, shape {_fmt_shape(x)} [B, T|S, H, D]; every axis needs "
                "at least one element (an empty batch or sequence has nothing to attend)"
            )
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{name}: batch sizes differ: q {_fmt_shape(q)}, k {_fmt_shape(k)}, v {_fmt_shape(v)}")
    Hkv = k.shape[2]
    if v.shape[2] != Hkv:
        raise ValueError(
            f"{name}: k and v head counts differ: k {_fmt_shape(k)}, v {_fmt_shape(v)}; "
            "keys and values come in pairs, one per kv head"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{name}: k and v lengths differ: k {_fmt_shape(k)}, v {_fmt_shape(v)}")
    if k.shape[3] != D:
        raise ValueError(f"{name}: q and k head widths differ: q {_fmt_shape(q)}, k {_fmt_shape(k)}")
    S = k.shape[1]
    if H != dims.num_heads:
        raise ValueError(f"{name}: built for num_heads={dims.num_heads}, called with H={H}; rebuild with num_heads={H}")
    if Hkv != dims.num_kv_heads:
        if H % Hkv:
            raise ValueError(
                f"{name}: q has {H} heads and k, v have {Hkv}: grouped-query attention needs the kv head "
                f"count to divide the query head count (q {_fmt_shape(q)}, k {_fmt_shape(k)})"
            )
        raise ValueError(
            f"{name}: built for num_kv_heads={dims.num_kv_heads}, called with k, v of {Hkv} heads; "
            f"rebuild with num_kv_heads={Hkv}"
        )
    if Hkv != H and not caps.gqa:
        raise CapabilityError(name, f"grouped-query attention ({H} query heads, {Hkv} kv heads)", "gqa")
    if D != dims.head_dim:
        raise ValueError(f"{name}: built for head_dim={dims.head_dim}, called with D={D}; rebuild with head_dim={D}")
    if max(T, S) > dims.max_len:
        raise ValueError(
            f"{name}: sequence length {max(T, S)} exceeds max_len={dims.max_len} given to build(); "
            f"build with max_len >= {max(T, S)}"
        )

    if T != S and not caps.cross:
        raise CapabilityError(name, f"cross attention with T={T} != S={S}", "cross")
    if mask is None:
        return
    if not isinstance(mask, Mask):
        raise TypeError(f"{name}: mask must be an efficient_attn.Mask, got {type(mask).__name__}")
    if not mask.causal and not caps.bidirectional:
        raise CapabilityError(name, "bidirectional attention (no causal mask); pass Mask(causal=True)", "bidirectional")
    if mask.causal:
        if not caps.causal:
            raise CapabilityError(name, "causal masking", "causal")
        if T != S:
            raise ValueError(f"{name}: causal masking needs T == S, got T={T}, S={S}")
    for field, want in (("kv_mask", (B, S)), ("q_mask", (B, T))):
        m = getattr(mask, field)
        if m is None:
            continue
        if tuple(m.shape) != want:
            raise ValueError(
                f"{name}: Mask.{field} must have shape [{want[0]}, {want[1]}] (batch, "
                f"{'keys' if field == 'kv_mask' else 'queries'}), got {_fmt_shape(m)}"
            )
        if m.dtype != jnp.bool_:
            raise TypeError(f"{name}: Mask.{field} must be bool (True = real token), got {m.dtype}; use m.astype(bool)")
    if mask.kv_mask is not None and not caps.kv_mask:
        raise CapabilityError(name, "a key padding mask (Mask.kv_mask)", "kv_mask")
    if mask.dense is not None:
        if not caps.dense_mask:
            raise CapabilityError(name, "a dense [B, H, T, S] mask (Mask.dense)", "dense_mask")
        d = mask.dense
        ok = d.ndim == 4 and d.shape[0] in (1, B) and d.shape[1] in (1, H) and d.shape[2:] == (T, S)
        if not ok:
            raise ValueError(f"{name}: Mask.dense must have shape [B|1, H|1, {T}, {S}], got {_fmt_shape(d)}")
        if d.dtype != jnp.bool_:
            raise TypeError(f"{name}: Mask.dense must be bool, got {d.dtype}")
    _check_segments(name, caps, mask, B, T, S)


def _check_segments(name: str, caps: Capabilities, mask: Mask, B: int, T: int, S: int) -> None:
    qs, ks = mask.q_segment_ids, mask.kv_segment_ids
    if qs is None and ks is None:
        return
    if not caps.segments:
        raise CapabilityError(name, "packed sequences (Mask.q_segment_ids / kv_segment_ids)", "segments")
    if qs is None or ks is None:
        missing = "q_segment_ids" if qs is None else "kv_segment_ids"
        raise ValueError(
            f"{name}: Mask.{missing} is missing; packed sequences need both q_segment_ids [B, T] and "
            "kv_segment_ids [B, S] (for self-attention pass the same ids twice)"
        )
    for field, m, want in (("q_segment_ids", qs, (B, T)), ("kv_segment_ids", ks, (B, S))):
        if tuple(m.shape) != want:
            raise ValueError(f"{name}: Mask.{field} must have shape [{want[0]}, {want[1]}], got {_fmt_shape(m)}")
        if not jnp.issubdtype(m.dtype, jnp.integer):
            raise TypeError(
                f"{name}: Mask.{field} must be integers (one id per packed sequence), got {m.dtype}; "
                "use ids.astype(jnp.int32)"
            )


def _as_array(name: str, arg: str, x):
    """numpy arrays and lists become jax arrays; anything else without a shape is refused."""
    if isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return x
    if isinstance(x, (np.ndarray, np.generic, list, tuple)):
        return jnp.asarray(x)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: {arg} must be an array, got {type(x).__name__}")
    return x


def normalise_mask(name: str, mask: Mask | None) -> Mask:
    """``None`` becomes ``Mask()``; mask arrays given as lists or numpy become jax arrays; a
    ``causal`` that is not a Python bool is refused (it decides the program's structure)."""
    if mask is None:
        return Mask()
    if not isinstance(mask, Mask):
        raise TypeError(f"{name}: mask must be an efficient_attn.Mask, got {type(mask).__name__}")
    causal = mask.causal
    if isinstance(causal, (np.bool_,)):
        causal = bool(causal)
    if isinstance(causal, jax.core.Tracer):
        raise TypeError(
            f"{name}: Mask.causal is a traced value; it is static (it decides which blocks exist): "
            "pass a Python bool, and under jit mark the argument that carries it static "
            "(jax.jit(f, static_argnames=...))"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"{name}: Mask.causal must be a bool, got {type(causal).__name__} {causal!r}")
    fields = {}
    for field in MASK_ARRAY_FIELDS:
        m = getattr(mask, field)
        if m is not None:
            m = _as_array(name, f"Mask.{field}", m)
        fields[field] = m
    return dataclasses.replace(mask, causal=causal, **fields)


def _check_output(name: str, out, q, v):
    expected = tuple(q.shape[:3]) + tuple(v.shape[3:])
    if out is None or not hasattr(out, "shape"):
        got = "None" if out is None else type(out).__name__
        raise TypeError(
            f"{name}: attend() returned {got}, expected an array [B, T, H, Dv] = {list(expected)}"
        )
    if tuple(out.shape) != expected:
        raise RuntimeError(
            f"{name}: returned shape {tuple(out.shape)}, expected {expected} [B, T, H, Dv] (a bug in the variant)"
        )
