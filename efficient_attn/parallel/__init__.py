"""Sequence (context) parallelism on a JAX device mesh.

    mesh.py            ``data=2,seq=4`` parsed into a ``Mesh``; axis and length checks; the
                       bytes a program's collectives move (``collective_bytes``)
    ring.py            ring attention: the exact path, k/v blocks passed round the ring and
                       merged by the online softmax; zigzag placement balances causal work
    context_linear.py  linear and gated linear attention: per-device chunk states combined
                       across devices in sequence order (all-gather + prefix of states)
    models.py          ``sequence_parallel(model, mesh)``: a model's attention cores replaced
                       by their sequence-parallel forms (a variant without one is refused)

On one machine, simulate devices before jax starts:
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, then ``make_mesh("data=2,seq=4")``.

Across processes or hosts (tested: 2 processes x 2 CPU devices on 127.0.0.1, gloo CPU
collectives, tests/parallel/test_multiprocess.py), every process runs the same program:

    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU only
    jax.distributed.initialize(coordinator_address="HOST0:PORT", num_processes=N, process_id=i)
    mesh = make_mesh("data=2,seq=4")      # over jax.devices(): all processes' devices
    x = jax.make_array_from_callback(shape, NamedSharding(mesh, P(None, "seq")), lambda idx: data[idx])

and each process supplies only the shards of its own devices. Put the ``seq`` axis on the
fastest links (devices of one host): the ring sends a k/v block per step, while "data"
only all-reduces gradients once per step.
"""

from efficient_attn.parallel.mesh import (
    axis_size,
    check_divisible,
    collective_bytes,
    format_mesh,
    make_mesh,
    parse_mesh,
)
from efficient_attn.parallel.ring import RingAttention, RingConfig, ring_attention, zigzag_order
from efficient_attn.parallel.context_linear import context_gated_linear_attention, context_linear_attention
from efficient_attn.parallel.models import (
    ONE_DEVICE,
    ContextParallelEngines,
    has_sequence_parallel_form,
    sequence_parallel,
    sequence_parallel_core,
)

__all__ = [
    "parse_mesh",
    "format_mesh",
    "make_mesh",
    "axis_size",
    "check_divisible",
    "collective_bytes",
    "ring_attention",
    "zigzag_order",
    "RingAttention",
    "RingConfig",
    "context_linear_attention",
    "context_gated_linear_attention",
    "sequence_parallel",
    "sequence_parallel_core",
    "has_sequence_parallel_form",
    "ContextParallelEngines",
    "ONE_DEVICE",
]
