"""A model's attention run sequence-parallel: ``sequence_parallel(model, mesh)``.

    mesh = make_mesh("data=2,seq=4")
    model = sequence_parallel(CausalLM(cfg, rngs=nnx.Rngs(0)), mesh, axis="seq", batch_axis="data")

(``train()`` does this itself for ``TrainConfig(mesh="data=2,seq=4")``, and the accuracy
experiment for ``--mesh data=2,seq=4``.)

Every ``nn.MultiHeadAttention`` core of ``model`` is replaced (in place; the model is
returned) by its sequence-parallel form, which runs under ``shard_map`` along ``axis``:

- an exact variant (capabilities ``exact``: it computes softmax attention, "full") becomes
  ``RingAttention`` (``parallel.ring``), whatever its own kernel;
- a variant that declares its engines (``attend_with(q, k, v, mask, engines)``, below)
  runs its own code with the context-parallel engines of ``parallel.context_linear`` in
  place of the one-device ones: its feature maps, gates and norms (position-wise) run on
  the whole arrays, only the engine call is split over the devices;
- any other variant has no sequence-parallel form and is refused, with the variants that
  have one named.

The engine protocol. A variant that computes its attention through ``ops.linear_attention``
or ``ops.gated_linear.gated_linear_attention`` opts in by writing its ``attend`` as

    def attend(self, q, k, v, mask):
        return self.attend_with(q, k, v, mask, ONE_DEVICE)

    def attend_with(self, q, k, v, mask, engines):
        ... engines.linear_attention(phi_q, phi_k, v, causal=..., ...) ...

where ``engines`` has the methods ``linear_attention`` and ``gated_linear_attention`` with
the engines' own signatures (``ONE_DEVICE`` calls the engines; ``ContextParallelEngines``
their context-parallel forms). Nothing else of the variant changes.

Parameters stay where they were for exact cores (they have none) and move under
``core.inner`` for wrapped ones. The mesh is part of the model's static structure (its
graphdef), so a step compiled for one mesh is not reused for another.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float

from efficient_attn.core import Attention, Mask
from efficient_attn.nn import MultiHeadAttention
from efficient_attn.ops.gated_linear import gated_linear_attention
from efficient_attn.ops.linear_attention import linear_attention
from efficient_attn.parallel.context_linear import context_gated_linear_attention, context_linear_attention
from efficient_attn.parallel.mesh import axis_size
from efficient_attn.parallel.ring import RingAttention, RingConfig

__all__ = [
    "sequence_parallel",
    "sequence_parallel_core",
    "has_sequence_parallel_form",
    "ContextParallelEngines",
    "ContextParallelAttention",
    "OneDeviceEngines",
    "ONE_DEVICE",
]


@dataclasses.dataclass(frozen=True)
class OneDeviceEngines:
    """The engines as they are (what a variant's ``attend`` passes to ``attend_with``)."""

    def linear_attention(self, *args, **kwargs):
        return linear_attention(*args, **kwargs)

    def gated_linear_attention(self, *args, **kwargs):
        return gated_linear_attention(*args, **kwargs)


ONE_DEVICE = OneDeviceEngines()


@dataclasses.dataclass(frozen=True)
class ContextParallelEngines:
    """The engines' context-parallel forms over ``mesh`` axis ``axis`` (same signatures)."""

    mesh: Mesh
    axis: str = "seq"
    batch_axis: str | None = None

    def linear_attention(self, *args, **kwargs):
        return context_linear_attention(*args, mesh=self.mesh, axis=self.axis, batch_axis=self.batch_axis, **kwargs)

    def gated_linear_attention(self, *args, **kwargs):
        return context_gated_linear_attention(*args, mesh=self.mesh, axis=self.axis, batch_axis=self.batch_axis,
                                              **kwargs)


class ContextParallelAttention(Attention):
    """A variant's own ``attend_with`` run on the context-parallel engines.

    Made per variant class by ``sequence_parallel_core`` (which sets ``capabilities`` and
    ``variant_name`` to the variant's, less decoding), so that the base class checks every
    call as the variant's own would be checked."""

    def __init__(self, inner: Attention, engines: ContextParallelEngines):
        super().__init__(inner.config, inner.dims, rngs=None)
        self.inner = inner
        self.engines = engines

    def attend(
        self,
        q: Float[Array, "B T H D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H Dv"],
        mask: Mask,
    ) -> Float[Array, "B T H Dv"]:
        return self.inner.attend_with(q, k, v, mask, self.engines)


_WRAPPERS: dict[type, type] = {}  # one wrapper class per variant class: equal graphdefs across calls


def _wrapper_class(cls: type) -> type:
    if cls not in _WRAPPERS:
        caps = dataclasses.replace(cls.capabilities, decode=False)
        _WRAPPERS[cls] = type(f"ContextParallel{cls.__name__}", (ContextParallelAttention,),
                              {"capabilities": caps, "variant_name": cls.variant_name, "__module__": __name__})
    return _WRAPPERS[cls]


def has_sequence_parallel_form(core: Attention | type) -> bool:
    """Whether ``core`` (a variant module or class) has a sequence-parallel form."""
    cls = core if isinstance(core, type) else type(core)
    return bool(cls.capabilities.exact) or callable(getattr(cls, "attend_with", None))


def _with_form() -> list[str]:
    from efficient_attn import registry  # the variants with a form, for the refusal message

    return [n for n in registry.list_variants() if has_sequence_parallel_form(registry.get_spec(n).cls)]


def sequence_parallel_core(core: Attention, mesh: Mesh, *, axis: str = "seq", batch_axis: str | None = None,
                           block_size: int = 1024, backward_query_block: int = 256) -> Attention:
    """The sequence-parallel form of one attention core (module docstring), or a refusal."""
    axis_size(mesh, axis, who="sequence_parallel")
    if batch_axis is not None:
        axis_size(mesh, batch_axis, who="sequence_parallel")
    if isinstance(core, (RingAttention, ContextParallelAttention)):
        raise ValueError(f"sequence_parallel: the core {core.variant_name!r} is already sequence-parallel")
    if type(core).capabilities.exact:
        return RingAttention(RingConfig(axis=axis, batch_axis=batch_axis, block_size=block_size,
                                        backward_query_block=backward_query_block), core.dims, mesh=mesh)
    if callable(getattr(type(core), "attend_with", None)):
        return _wrapper_class(type(core))(core, ContextParallelEngines(mesh, axis, batch_axis))
    raise ValueError(
        f"sequence_parallel: variant {core.variant_name!r} has no sequence-parallel form: ring attention "
        "needs an exact softmax variant (capabilities exact=True), context-parallel linear attention a variant "
        "that declares its engines (attend_with(q, k, v, mask, engines); see efficient_attn.parallel.models). "
        f"Variants with a form: {', '.join(_with_form()) or 'none'}; or run this model without a 'seq' mesh axis"
    )


def sequence_parallel(model: nnx.Module, mesh: Mesh, *, axis: str = "seq", batch_axis: str | None = None,
                      block_size: int = 1024, backward_query_block: int = 256) -> nnx.Module:
    """``model`` with every ``MultiHeadAttention`` core replaced by its sequence-parallel
    form along ``axis`` (``batch_axis``: the mesh axis the batch is split over, or None).
    Modifies ``model`` in place and returns it; refuses (before changing anything) a model
    with a core that has no form, or none at all."""
    layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, MultiHeadAttention)]
    if not layers:
        raise ValueError(f"sequence_parallel: {type(model).__name__} has no MultiHeadAttention layer to parallelise")
    cores = [sequence_parallel_core(layer.core, mesh, axis=axis, batch_axis=batch_axis, block_size=block_size,
                                    backward_query_block=backward_query_block) for layer in layers]
    for layer, core in zip(layers, cores):
        layer.core = core
        layer.fast_core = None  # the parallel form replaces the fast twin as well
    return model
