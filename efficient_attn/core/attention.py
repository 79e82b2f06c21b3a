"""``Attention``, the base class of every variant: it owns the call and the decoding API.

``__call__`` validates (``validation.py``), zeroes masked keys, values and queries
(``_zero_masked``), runs the variant's ``attend`` and checks what came back; a subclass's own
``__call__`` (the older plugin style) is wrapped with the same steps (``_wrap_legacy_call``).
``init_state`` / ``prefill`` / ``step`` validate and call the variant's decoding hooks (the state
is ``decode.DecodeState``). ``implements_attention`` tells the registry whether a class provides
either method.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from efficient_attn.core.capabilities import Capabilities, CapabilityError
from efficient_attn.core.checks import _is_int
from efficient_attn.core.decode import DecodeState, _check_value_width
from efficient_attn.core.dims import Dims
from efficient_attn.core.mask import Mask
from efficient_attn.core.validation import _as_array, _check_output, _fmt_shape, normalise_mask, validate_inputs


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
