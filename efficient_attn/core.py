"""The one interface: ``Attention``, ``Mask``, ``Capabilities``, ``Dims`` and input validation.

Every attention variant in efficient-attn is an ``Attention`` subclass with the signature

    out = attn(q, k, v, *, mask=None)
    q: Float[Array, "B T H D"], k: Float[Array, "B S H D"], v: Float[Array, "B S H Dv"]
    out: Float[Array, "B T H Dv"]

(the layout of ``jax.nn.dot_product_attention``). The framework, not the variant, checks
the inputs and the variant's declared ``Capabilities`` before the variant's own code runs:
``Attention.__init_subclass__`` wraps every subclass's ``__call__``, so a plugin written in
another file gets the same checks for free. After the variant returns, outputs at masked
queries (``Mask.q_mask``) are set to zero.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

__all__ = ["Attention", "Capabilities", "Dims", "Mask", "validate_inputs"]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a variant can honour; checked on every call, never decorative.

    causal:      supports ``Mask(causal=True)`` (query i sees keys j <= i; needs T == S).
    cross:       supports cross attention with T != S.
    kv_mask:     supports ``Mask(kv_mask=...)`` (padding of keys).
    dense_mask:  supports ``Mask(dense=...)``, an arbitrary ``[B, H, T, S]`` boolean mask.
    exact:       equals softmax attention ("full") up to floating point.
    shared_qk:   keys are the (normalised) queries and ``k`` is ignored, as in Reformer; a
                 comparison against "full" must then give "full" those keys too.
    time/memory: big-O cost in the sequence length N (strings, for tables).
    """

    causal: bool = False
    cross: bool = False
    kv_mask: bool = False
    dense_mask: bool = False
    exact: bool = False
    shared_qk: bool = False
    time: str = "O(N^2)"
    memory: str = "O(N^2)"


@dataclasses.dataclass(frozen=True)
class Dims:
    """Sizes fixed at construction: heads, per-head width, and the longest sequence."""

    num_heads: int
    head_dim: int
    max_len: int

    def __post_init__(self):
        for name in ("num_heads", "head_dim", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Dims.{name} must be a positive int, got {value!r}")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["kv_mask", "q_mask", "dense"],
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

    A query that sees no key at all gets a zero output: never NaN, never mean(V).
    """

    causal: bool = False
    kv_mask: Bool[Array, "B S"] | None = None
    q_mask: Bool[Array, "B T"] | None = None
    dense: Bool[Array, "B H T S"] | None = None


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
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{name}: batch sizes differ: q {_fmt_shape(q)}, k {_fmt_shape(k)}, v {_fmt_shape(v)}")
    if k.shape[2] != H or v.shape[2] != H:
        raise ValueError(f"{name}: head counts differ: q {_fmt_shape(q)}, k {_fmt_shape(k)}, v {_fmt_shape(v)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{name}: k and v lengths differ: k {_fmt_shape(k)}, v {_fmt_shape(v)}")
    if k.shape[3] != D:
        raise ValueError(f"{name}: q and k head widths differ: q {_fmt_shape(q)}, k {_fmt_shape(k)}")
    S = k.shape[1]
    if H != dims.num_heads:
        raise ValueError(f"{name}: built for num_heads={dims.num_heads}, called with H={H}; rebuild with num_heads={H}")
    if D != dims.head_dim:
        raise ValueError(f"{name}: built for head_dim={dims.head_dim}, called with D={D}; rebuild with head_dim={D}")
    if max(T, S) > dims.max_len:
        raise ValueError(
            f"{name}: sequence length {max(T, S)} exceeds max_len={dims.max_len} given to build(); "
            f"build with max_len >= {max(T, S)}"
        )
    if T == 0 or S == 0:
        raise ValueError(f"{name}: empty sequence (T={T}, S={S})")

    if T != S and not caps.cross:
        raise CapabilityError(name, f"cross attention with T={T} != S={S}", "cross")
    if mask is None:
        return
    if not isinstance(mask, Mask):
        raise TypeError(f"{name}: mask must be an efficient_attn.Mask, got {type(mask).__name__}")
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


class CapabilityError(ValueError):
    """A variant was asked for something its ``Capabilities`` do not include."""

    def __init__(self, name: str, request: str, capability: str):
        from efficient_attn import registry  # late: registry imports core

        able = [n for n in registry.list_variants() if getattr(registry.get_spec(n).capabilities, capability)]
        super().__init__(
            f"variant {name!r} cannot do {request} (capabilities.{capability}=False); "
            f"variants that can: {', '.join(able) if able else 'none registered'}"
        )
        self.variant, self.request, self.capability = name, request, capability


def _validated(call):
    @functools.wraps(call)
    def wrapper(self, q, k, v, *, mask: Mask | None = None, **kwargs):
        validate_inputs(self.variant_name, self.capabilities, self.dims, q, k, v, mask)
        out = call(self, q, k, v, mask=mask, **kwargs)
        expected = q.shape[:3] + v.shape[3:]
        if out.shape != expected:
            raise RuntimeError(f"{self.variant_name}: returned shape {out.shape}, expected {expected} (a bug in the variant)")
        if mask is not None and mask.q_mask is not None:
            out = jnp.where(mask.q_mask[:, :, None, None], out, jnp.zeros((), out.dtype))
        return out.astype(q.dtype)

    wrapper.__ea_validated__ = True
    return wrapper


class Attention(nnx.Module):
    """Base class of every attention variant.

    A subclass declares ``capabilities`` (a ``Capabilities``) as a class attribute, is
    constructed as ``cls(config, dims, *, rngs)``, and implements

        __call__(q: Float[Array, "B T H D"], k: Float[Array, "B S H D"],
                 v: Float[Array, "B S H Dv"], *, mask: Mask | None = None)
            -> Float[Array, "B T H Dv"]

    Inputs are validated against ``capabilities`` before the subclass's ``__call__`` runs;
    outputs at masked queries are zeroed after it returns. Register the class with
    ``efficient_attn.register(name, config=ConfigDataclass)``.
    """

    capabilities: ClassVar[Capabilities] = Capabilities()
    variant_name: ClassVar[str] = "<unregistered>"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is not None and not getattr(call, "__ea_validated__", False):
            cls.__call__ = _validated(call)
        if not isinstance(cls.__dict__.get("capabilities", cls.capabilities), Capabilities):
            raise TypeError(f"{cls.__name__}.capabilities must be an efficient_attn.Capabilities")

    def __init__(self, config: Any, dims: Dims, *, rngs: nnx.Rngs):
        self.config = config
        self.dims = dims

    def __call__(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        *,
        mask: Mask | None = None,
    ) -> Float[Array, "B T H Dv"]:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")


def check_config(variant: str, condition: bool, message: str) -> None:
    """Raise ``ValueError("<variant>: <message>")`` when ``condition`` is false (config checks)."""
    if not condition:
        raise ValueError(f"{variant}: bad hyperparameter: {message}")


def check_positive_int(variant: str, field: str, value: Any, minimum: int = 1) -> None:
    """Config check for an integer hyperparameter ``>= minimum``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    check_config(variant, ok, f"{field} must be an int >= {minimum}, got {value!r}")
