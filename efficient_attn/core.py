"""The one interface: ``Attention``, ``Mask``, ``Capabilities``, ``Dims``, validation, errors.

Every attention variant in efficient-attn is an ``Attention`` subclass called as

    out = attn(q, k, v, *, mask=None)
    q: Float[Array, "B T H D"], k: Float[Array, "B S H D"], v: Float[Array, "B S H Dv"]
    out: Float[Array, "B T H Dv"]

(the layout of ``jax.nn.dot_product_attention``). The base class owns that call: it checks
the inputs and the variant's declared ``Capabilities``, normalises the mask, zeroes masked
keys, values and queries (so that garbage there cannot matter), and only then runs the
variant's one method, ``attend(q, k, v, mask)``; afterwards it checks the result, zeroes the
outputs of masked queries (``Mask.q_mask``) and casts to the input dtype. A
plugin in another file gets all of it for free. ``core`` imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "Attention",
    "Capabilities",
    "CapabilityError",
    "DecodeState",
    "Dims",
    "Mask",
    "check_config",
    "check_positive_int",
    "normalise_mask",
    "validate_inputs",
]

MASK_ARRAY_FIELDS = ("kv_mask", "q_mask", "dense", "q_segment_ids", "kv_segment_ids")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a variant can honour; checked on every call, never decorative.

    causal:      supports ``Mask(causal=True)`` (query i sees keys j <= i; needs T == S).
    bidirectional: supports attention without a causal mask (False for recurrences that are
                 causal by construction: a gated or delta-rule state only runs forward).
    cross:       supports cross attention with T != S.
    kv_mask:     supports ``Mask(kv_mask=...)`` (padding of keys).
    dense_mask:  supports ``Mask(dense=...)``, an arbitrary ``[B, H, T, S]`` boolean mask.
    exact:       equals softmax attention ("full") up to floating point.
    shared_qk:   keys are the (normalised) queries and ``k`` is ignored, as in Reformer; a
                 comparison against "full" must then give "full" those keys too.
    gqa:         supports grouped-query attention: k and v with ``num_kv_heads`` < H heads,
                 query head h reading kv head ``h // (H / num_kv_heads)``.
    segments:    supports packed sequences (``Mask.q_segment_ids`` / ``kv_segment_ids``).
    softcap:     has a logit soft cap option (``softcap``: s -> c tanh(s / c)).
    sinks:       has a learned per-head sink logit option (``sinks``) in every denominator.
    decode:      has the decoding state API (``init_state``, ``prefill``, ``step``).
    time/memory: big-O cost in the sequence length N (strings, for tables).
    """

    causal: bool = False
    bidirectional: bool = True
    cross: bool = False
    kv_mask: bool = False
    dense_mask: bool = False
    exact: bool = False
    shared_qk: bool = False
    gqa: bool = False
    segments: bool = False
    softcap: bool = False
    sinks: bool = False
    decode: bool = False
    time: str = "O(N^2)"
    memory: str = "O(N^2)"


@dataclasses.dataclass(frozen=True)
class Dims:
    """Sizes fixed at construction: query heads, per-head width, the longest sequence, and
    the key/value heads (``num_kv_heads``, default ``num_heads``; fewer is grouped-query
    attention and must divide ``num_heads``)."""

    num_heads: int
    head_dim: int
    max_len: int
    num_kv_heads: int | None = None

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in ("num_heads", "head_dim", "max_len", "num_kv_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"Dims.{name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}; "
                f"choose num_kv_heads among {[d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=list(MASK_ARRAY_FIELDS),
    meta_fields=["causal"],
)
@dataclasses.dataclass(frozen=True)
class Mask:
    """Which (query, key) pairs may interact. A pytree: passes through ``jit`` and ``vmap``.

    causal:  query i sees only keys j <= i (self-attention, T == S).
    kv_mask: ``[B, S]`` bool, True = a real key; False keys are never attended to.
    q_mask:  ``[B, T]`` bool, True = a real query; outputs at False queries are zero.
    dense:   ``[B, H, T, S]`` bool (H and B may be 1 to broadcast), only for variants whose
             capabilities say ``dense_mask``.
    q_segment_ids / kv_segment_ids: ``[B, T]`` / ``[B, S]`` integers for packed sequences:
             a query sees only keys of its own segment (and, with ``causal``, only earlier
             ones of it). Given together, only for variants whose capabilities say
             ``segments``. Packing writes them sorted (0, 0, 1, 1, 1, 2, ...).

    A query that sees no key at all gets a zero output: never NaN, never mean(V).
    """

    causal: bool = False
    kv_mask: Bool[Array, "B S"] | None = None
    q_mask: Bool[Array, "B T"] | None = None
    dense: Bool[Array, "B H T S"] | None = None
    q_segment_ids: Int[Array, "B T"] | None = None
    kv_segment_ids: Int[Array, "B S"] | None = None



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


class CapabilityError(ValueError):
    """A variant was asked for something its ``Capabilities`` do not include.

    The message names the variant, the request, the capability flag and the registered
    variants that have it (looked up through ``set_capability_directory``, which the registry
    installs, so that ``core`` never imports ``registry``).
    """

    def __init__(self, name: str, request: str, capability: str):
        able = _capability_directory(capability)
        super().__init__(
            f"variant {name!r} cannot do {request} (capabilities.{capability}=False); "
            f"variants that can: {', '.join(able) if able else 'none registered'}"
        )
        self.variant, self.request, self.capability = name, request, capability


def _no_directory(capability: str) -> list[str]:
    return []


_capability_directory: Callable[[str], list[str]] = _no_directory


def set_capability_directory(directory: Callable[[str], list[str]]) -> None:
    """Install the function that lists the variants having a capability (the registry does)."""
    global _capability_directory
    _capability_directory = directory


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


class Attention(nnx.Module):
    """Base class of every attention variant; it owns the call.

    A subclass declares ``capabilities`` (a ``Capabilities``) as a class attribute, is
    constructed as ``cls(config, dims, *, rngs)`` and implements ONE method:

        attend(q: Float[Array, "B T H D"], k: Float[Array, "B S H D"],
               v: Float[Array, "B S H Dv"], mask: Mask) -> Float[Array, "B T H Dv"]

    ``mask`` is always a ``Mask`` (never None; its array fields are None where everything is
    real). ``__call__(q, k, v, *, mask=None)`` belongs to the base class: it turns numpy
    inputs into jax arrays, validates shapes, dtypes and ``max_len``, enforces
    ``capabilities``, normalises the mask, replaces masked keys, values and queries by zeros,
    calls ``attend``, checks what came back, zeroes
    the outputs of ``q_mask=False`` queries and returns ``q.dtype``.

    A subclass that overrides ``__call__(q, k, v, *, mask=None)`` instead (the older way)
    keeps working: its ``__call__`` is wrapped with the same steps. A subclass whose
    ``__init__`` does not call ``super().__init__`` gets ``config`` and ``dims`` from
    ``efficient_attn.build``. Register the class with
    ``efficient_attn.register(name, config=ConfigDataclass)``.
    """

    capabilities: ClassVar[Capabilities] = Capabilities()
    variant_name: ClassVar[str] = "<unregistered>"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is not None and not getattr(call, "__ea_validated__", False):
            if "attend" in cls.__dict__:
                raise TypeError(
                    f"{cls.__name__} defines both attend() and __call__(); implement attend() only "
                    "(the base class's __call__ validates and then calls it)"
                )
            cls.__call__ = _wrap_legacy_call(call)
        if not isinstance(cls.__dict__.get("capabilities", cls.capabilities), Capabilities):
            raise TypeError(f"{cls.__name__}.capabilities must be an efficient_attn.Capabilities")

    def __init__(self, config: Any, dims: Dims, *, rngs: nnx.Rngs):
        self.config = config
        self.dims = dims

    def _prepare(self, q, k, v, mask):
        name = self.variant_name
        dims = getattr(self, "dims", None)
        if not isinstance(dims, Dims):
            raise AttributeError(
                f"{type(self).__name__} has no dims: its __init__ did not call "
                "super().__init__(config, dims, rngs=rngs) and it was not made by efficient_attn.build(); "
                "call super().__init__ first in __init__, or construct it with ea.build(name, ...)"
            )
        q, k, v = (_as_array(name, arg, x) for arg, x in (("q", q), ("k", k), ("v", v)))
        mask = normalise_mask(name, mask)
        validate_inputs(name, self.capabilities, dims, q, k, v, mask)
        q, k, v = _zero_masked(self.capabilities, q, k, v, mask)
        return q, k, v, mask

    def _finish(self, out, q, v, mask: Mask):
        _check_output(self.variant_name, out, q, v)
        if mask.q_mask is not None:
            out = jnp.where(mask.q_mask[:, :, None, None], out, jnp.zeros((), out.dtype))
        return out.astype(q.dtype)

    def __call__(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        *,
        mask: Mask | None = None,
    ) -> Float[Array, "B T H Dv"]:
        q, k, v, mask = self._prepare(q, k, v, mask)
        return self._finish(self.attend(q, k, v, mask), q, v, mask)

    __call__.__ea_validated__ = True  # type: ignore[attr-defined]

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        """The attention itself, on validated inputs; ``mask`` is never None."""
        raise NotImplementedError(f"{type(self).__name__} must implement attend(q, k, v, mask)")

    # ------------------------------------------------------------------------ decoding
    # The state API (capability ``decode``). The base class validates, keeps the position and
    # refuses what cannot be honoured; a variant implements three protected hooks, called on
    # validated inputs:
    #   _init_decode_state(batch, max_len, dtype) -> data     fixed-size arrays (a pytree)
    #   _prefill(q, k, v, mask, state) -> (out [B, T, H, Dv], data)   mask.causal; state empty
    #   _step(q_t, k_t, v_t, state) -> (out_t [B, H, Dv], data)       q_t [B, H, D]
    # (``state`` a DecodeState: its data, position, max_len). A step is the causal forward's
    # output at ``state.position`` (the number of tokens before it), every stepped token real.

    def init_state(self, batch: int, max_len: int | None = None, dtype: Any = jnp.float32) -> "DecodeState":
        """An empty decoding state for ``batch`` sequences of at most ``max_len`` tokens.

        ``max_len`` (default ``dims.max_len``, the most allowed) bounds the positions: a KV
        cache has that many slots; a recurrent state or a window's ring buffer has a size
        independent of it. ``dtype`` stores cached keys and values (a recurrent state is
        accumulated in float32 whatever it is).
        """
        name = self.variant_name
        self._require_decode("init_state")
        dims = self._decode_dims()
        if not _is_int(batch) or batch < 1:
            raise ValueError(f"{name}: init_state(batch=...) must be a positive int, got {batch!r}")
        max_len = dims.max_len if max_len is None else max_len
        if not _is_int(max_len) or max_len < 1:
            raise ValueError(f"{name}: init_state(max_len=...) must be a positive int, got {max_len!r}")
        if max_len > dims.max_len:
            raise ValueError(
                f"{name}: init_state(max_len={max_len}) exceeds max_len={dims.max_len} given to build(); "
                f"build with max_len >= {max_len}"
            )
        try:
            dt = jnp.dtype(dtype)
        except TypeError:
            raise TypeError(f"{name}: init_state(dtype=...) must be a floating dtype, got {dtype!r}") from None
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"{name}: init_state(dtype=...) must be a floating dtype (float32, bfloat16), got {dt}")
        data = self._init_decode_state(int(batch), int(max_len), dt)
        return DecodeState(
            variant=name, config=repr(self.config), dims=dims, batch=int(batch), max_len=int(max_len),
            dtype=dt.name, position=jnp.zeros((), jnp.int32), data=data,
        )

    def prefill(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B T H D"],
        v: Float[Array, "B T H Dv"],
        state: "DecodeState",
        *,
        mask: Mask | None = None,
    ) -> tuple[Float[Array, "B T H Dv"], "DecodeState"]:
        """Consume a prompt of T tokens from an empty ``state``: ``(out, state)``, where ``out``
        is the causal attention of the prompt (what ``self(q, k, v, mask=Mask(causal=True,
        ...))`` returns) and ``state`` holds it for ``step``.

        ``mask``: None (every token real) or ``Mask(causal=True, kv_mask=...)`` for key padding
        in the prompt (a padded key stays invisible to every later step); ``q_mask`` zeroes
        outputs as in a call. Dense masks and packed segments are refused: a cache cannot
        carry them into the steps. ``state`` must be empty; under ``jit`` (where that cannot
        raise) a used state gives NaN outputs.
        """
        name = self.variant_name
        self._require_decode("prefill")
        mask = normalise_mask(name, Mask(causal=True) if mask is None else mask)
        if not mask.causal:
            raise ValueError(
                f"{name}: prefill attends causally (a decoded token never sees later ones): pass "
                "mask=Mask(causal=True, kv_mask=...) or mask=None"
            )
        if mask.dense is not None or mask.q_segment_ids is not None or mask.kv_segment_ids is not None:
            raise ValueError(
                f"{name}: prefill takes key padding (Mask.kv_mask) and Mask.q_mask only; a dense mask or "
                "packed segments cannot be carried into the steps: decode one sequence per batch row"
            )
        q, k, v, mask = self._prepare(q, k, v, mask)
        _check_value_width(name, v, self.dims)
        self._check_state(state, q.shape[0], "prefill")
        T = q.shape[1]
        if T > state.max_len:
            raise ValueError(
                f"{name}: a prompt of {T} tokens does not fit a state of max_len={state.max_len}; "
                f"make it with init_state(batch, max_len >= {T} + the tokens to generate)"
            )
        position = state.position
        if not isinstance(position, jax.core.Tracer) and int(position) != 0:
            raise ValueError(
                f"{name}: prefill starts a sequence, but this state already holds {int(position)} tokens; "
                "pass a fresh init_state(...), and continue a sequence with step()"
            )
        out, data = self._prefill(q, k, v, mask, state)
        out = self._finish(out, q, v, mask)
        out = jnp.where(position == 0, out, jnp.full((), jnp.nan, out.dtype))
        return out, dataclasses.replace(state, position=position + T, data=data)

    def step(
        self,
        q_t: Float[Array, "B 1 H D"],
        k_t: Float[Array, "B 1 H D"],
        v_t: Float[Array, "B 1 H Dv"],
        state: "DecodeState",
    ) -> tuple[Float[Array, "B 1 H Dv"], "DecodeState"]:
        """One token at position ``state.position``: ``(out_t, state)``, where ``out_t`` is the
        causal attention of this query over every key so far (the prompt's real keys and all
        stepped ones, this one included). Pure: jit it, scan it.

        A step at position >= ``state.max_len`` raises when the position is concrete. Under
        ``jit`` it cannot raise: its output is NaN (every entry), and so is every later
        step's, since the position only grows; the state's arrays are then undefined.
        """
        name = self.variant_name
        self._require_decode("step")
        dims = self._decode_dims()
        q_t, k_t, v_t = (_as_array(name, arg, x) for arg, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)))
        for arg, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
            if getattr(x, "ndim", 0) != 4 or x.shape[1] != 1:
                raise ValueError(
                    f"{name}: step takes one token: {arg} must be [B, 1, H, D], got shape {_fmt_shape(x)}; "
                    "give a prompt to prefill()"
                )
        validate_inputs(name, self.capabilities, dims, q_t, k_t, v_t, None)
        _check_value_width(name, v_t, dims)
        B = q_t.shape[0]
        self._check_state(state, B, "step")
        position = state.position
        if not isinstance(position, jax.core.Tracer) and int(position) >= state.max_len:
            raise ValueError(
                f"{name}: step at position {int(position)} is past the state's max_len={state.max_len}; "
                "make the state with init_state(batch, max_len=...) for the whole sequence (prompt + new tokens)"
            )
        out, data = self._step(q_t[:, 0], k_t[:, 0], v_t[:, 0], state)
        expected = (B, q_t.shape[2], v_t.shape[3])
        if not hasattr(out, "shape") or tuple(out.shape) != expected:
            got = type(out).__name__ if not hasattr(out, "shape") else tuple(out.shape)
            raise RuntimeError(f"{name}: _step returned {got}, expected {expected} [B, H, Dv] (a bug in the variant)")
        out = jnp.where(position < state.max_len, out, jnp.full((), jnp.nan, out.dtype))
        return out[:, None].astype(q_t.dtype), dataclasses.replace(state, position=position + 1, data=data)

    def _require_decode(self, method: str) -> None:
        if not self.capabilities.decode:
            raise CapabilityError(self.variant_name, f"decoding ({method}: the init_state / prefill / step API)", "decode")

    def _decode_dims(self) -> Dims:
        dims = getattr(self, "dims", None)
        if not isinstance(dims, Dims):
            raise AttributeError(
                f"{type(self).__name__} has no dims: call super().__init__(config, dims, rngs=rngs) in __init__, "
                "or construct it with ea.build(name, ...)"
            )
        return dims

    def _check_state(self, state: "DecodeState", batch: int, method: str) -> None:
        """Refuse a state that this module did not make for this batch (clear messages)."""
        name = self.variant_name
        if not isinstance(state, DecodeState):
            raise TypeError(f"{name}: {method} needs the state made by init_state(...), got {type(state).__name__}")
        if state.variant != name:
            raise ValueError(
                f"{name}: {method} got a state of variant {state.variant!r}; a variant decodes only its own "
                "state: make one with this module's init_state(...)"
            )
        if state.config != repr(self.config) or state.dims != self.dims:
            raise ValueError(
                f"{name}: {method} got a state made for another configuration or size "
                f"({state.config}, {state.dims}); this module has {self.config!r}, {self.dims}: make the state "
                "with this module's init_state(...)"
            )
        if state.batch != batch:
            raise ValueError(
                f"{name}: {method} got batch {batch} but the state holds {state.batch} sequences; "
                f"make it with init_state(batch={batch}, ...)"
            )
        if jnp.shape(state.position) != ():
            raise ValueError(f"{name}: state.position must be a scalar, got shape {jnp.shape(state.position)}")

    def _init_decode_state(self, batch: int, max_len: int, dtype: Any) -> Any:
        """The variant's empty decoding arrays (a pytree whose sizes never change)."""
        raise NotImplementedError(f"{type(self).__name__} declares decode=True but does not implement _init_decode_state")

    def _prefill(self, q, k, v, mask: Mask, state: "DecodeState") -> tuple[Any, Any]:
        """(causal attention of the prompt [B, T, H, Dv], data holding it); ``state`` is empty."""
        raise NotImplementedError(f"{type(self).__name__} declares decode=True but does not implement _prefill")

    def _step(self, q_t, k_t, v_t, state: "DecodeState") -> tuple[Any, Any]:
        """(output of the token at ``state.position`` [B, H, Dv], data with it); q_t [B, H, D]."""
        raise NotImplementedError(f"{type(self).__name__} declares decode=True but does not implement _step")


def _check_value_width(name: str, v, dims: Dims) -> None:
    if v.shape[3] != dims.head_dim:
        raise ValueError(
            f"{name}: decoding states hold values of width head_dim={dims.head_dim}, got v of shape "
            f"{_fmt_shape(v)}; project values to head_dim"
        )


def _zero_masked(caps: Capabilities, q, k, v, mask: Mask):
    """Zeros (``where``, not a product) at masked keys and values and at masked queries.

    Padding and unfilled cache slots hold garbage in real use; replaced here, a NaN or Inf
    there cannot reach any output or gradient whatever the variant's arithmetic (a zero
    weight times NaN is NaN), and the gradients at those positions are exactly zero. A
    ``q_mask=False`` query's output is zeroed afterwards anyway. A shared-QK variant reads its
    keys from ``q``: its queries are zeroed only where they are no key either.
    """
    zero = lambda x, keep: jnp.where(keep[:, :, None, None], x, jnp.zeros((), x.dtype))  # noqa: E731
    if mask.kv_mask is not None:
        k, v = zero(k, mask.kv_mask), zero(v, mask.kv_mask)
    keep_q = mask.q_mask
    if keep_q is not None and caps.shared_qk:
        keep_q = None if mask.kv_mask is None else keep_q | mask.kv_mask
    if keep_q is not None:
        q = zero(q, keep_q)
    return q, k, v


def _wrap_legacy_call(call):
    """A subclass's own ``__call__`` gets the base class's checks around it."""

    @functools.wraps(call)
    def wrapper(self, q, k, v, *, mask: Mask | None = None, **kwargs):
        q, k, v, mask = self._prepare(q, k, v, mask)
        return self._finish(call(self, q, k, v, mask=mask, **kwargs), q, v, mask)

    wrapper.__ea_validated__ = True
    return wrapper


def implements_attention(cls: type) -> bool:
    """Whether ``cls`` (an ``Attention`` subclass) provides ``attend`` or its own ``__call__``."""
    return cls.attend is not Attention.attend or cls.__call__ is not Attention.__call__


def check_config(variant: str, condition: bool, message: str) -> None:
    """Raise ``ValueError("<variant>: <message>")`` when ``condition`` is false (config checks)."""
    if not condition:
        raise ValueError(f"{variant}: bad hyperparameter: {message}")


def _is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_positive_int(variant: str, field: str, value: Any, minimum: int = 1) -> None:
    """Config check for an integer hyperparameter ``>= minimum`` (numpy integers accepted)."""
    ok = _is_int(value) and value >= minimum
    check_config(variant, ok, f"{field} must be an int >= {minimum}, got {value!r}")
