"""Training on devices: the mesh a ``TrainConfig`` names (``mesh_axes``), batches and parameters
put on it (``_Sharder``), and the model made sequence-parallel for it (``_on_mesh``).

- Devices. Without ``TrainConfig.mesh`` the batch is sharded over every local device
  (``Mesh(jax.devices(), ("data",))``, batch axis on "data"), parameters replicated. With
  ``mesh="data=2,seq=4"`` (axes "data" and "seq" only, sizes multiplying to
  ``jax.device_count()``) the batch goes on ``P("data")`` of that mesh (its ``[B, L]`` arrays
  on ``P("data", "seq")``), parameters are
  replicated, and when "seq" has more than one device every attention core of (a copy of)
  the model is replaced by its sequence-parallel form along "seq" (``parallel.models.
  sequence_parallel``: ring attention for exact cores, context-parallel engines for the
  linear ones; a core without a form is refused). The batch size (train and eval) must be
  divisible by "data" and the attention's sequence length by "seq"; all of this is checked
  before a device is touched. Loss and gradients are those of the one-device run (to float32
  rounding; tests/parallel/test_training.py). On a CPU, simulate the devices before jax
  starts: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The returned ``model`` is
  then the sequence-parallel one (it runs on the mesh).

``_on_mesh`` takes a ``TrainConfig``, named in its annotation as a string only: ``config.py``
imports ``mesh_axes`` from here, not the other way round.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from efficient_attn.parallel.mesh import check_divisible, make_mesh, parse_mesh
from efficient_attn.parallel.models import sequence_parallel
from efficient_attn.tasks.base import TaskData
from efficient_attn.train.batches import Batch


MESH_AXES = ("data", "seq")  # the batch is split over "data", the attention's sequence over "seq"


def mesh_axes(spec: str) -> dict[str, int]:
    """``"data=2,seq=4"`` -> ``{"data": 2, "seq": 4}`` for training: ``parallel.parse_mesh``,
    and only the axes ``train`` knows (``MESH_AXES``); a ``ValueError`` naming the fix else."""
    if not isinstance(spec, str):
        raise ValueError(f"mesh must be a spec string such as 'data=2,seq=4' (or None), got {spec!r}")
    axes = parse_mesh(spec)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
        raise ValueError(
            f"axis {unknown[0]!r} of mesh {spec!r} is not one training uses; name only "
            f"{' and '.join(map(repr, MESH_AXES))} ('data': the batch is split over it; 'seq': the attention "
            "runs sequence-parallel along it), "
            "e.g. 'data=2,seq=4'"
        )
    return axes


class _Sharder:
    """Puts batches on the 'data' axis of ``mesh`` (default: every local device on 'data'),
    params replicated. A mesh without a 'data' axis gets every batch whole on each device.

    With a 'seq' axis of more than one device, the arrays with a sequence axis (tokens, mask,
    per-token targets, segment ids: ``[B, L]``) are split along it too, so the embeddings,
    MLPs and head hold 1/P of each sequence per device, as the sequence-parallel attention
    does: per-device activation memory falls with P (the scaling experiment's ``lm`` rows
    measure it). A length the axis does not divide (a model adding a CLS position makes the
    attention's length, not L, the one checked) stays whole on each device."""

    def __init__(self, batch_size: int, mesh: Mesh | None = None):
        if mesh is None:
            devices = jax.devices()
            if batch_size % len(devices):
                raise ValueError(
                    f"batch_size={batch_size} must be divisible by the {len(devices)} local devices "
                    f"(the batch is sharded over them); use a multiple of {len(devices)}"
                )
            mesh = Mesh(np.array(devices), ("data",))
        self.mesh = mesh
        data = "data" if "data" in mesh.shape else None
        self.seq_size = int(mesh.shape.get("seq", 1))
        self.batch = NamedSharding(mesh, P(data))
        self.per_token = NamedSharding(mesh, P(data, "seq")) if self.seq_size > 1 else self.batch
        self.replicated = NamedSharding(mesh, P())

    def put_batch(self, batch: Batch) -> Batch:
        length = batch.tokens.shape[1]
        split = self.seq_size > 1 and length % self.seq_size == 0

        def put(x):
            if x is None:
                return None
            on_tokens = split and np.ndim(x) >= 2 and np.shape(x)[1] == length
            return jax.device_put(x, self.per_token if on_tokens else self.batch)

        return Batch(*(put(x) for x in batch))

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)


def _on_mesh(model: nnx.Module, data: TaskData, cfg: "TrainConfig") -> tuple[nnx.Module, Mesh]:
    """The mesh of ``cfg.mesh`` and the model to train on it: a copy whose attention cores are
    sequence-parallel along "seq" when that axis has more than one device (the caller's model
    is left as it was). What is wrong with the request (a length "seq" does not divide, a core
    without a sequence-parallel form) is refused before the devices are counted."""
    axes = cfg.mesh_sizes()
    seq = axes.get("seq", 1)
    batch_axis = "data" if "data" in axes else None
    if seq > 1:
        abstract = AbstractMesh(tuple(axes.values()), tuple(axes))
        tokens = int(np.asarray(data.train.inputs).shape[1])
        m = getattr(model, "cfg", None)  # nn's configs: attention_len - max_len positions the model adds
        extra = int(m.attention_len - m.max_len) if hasattr(m, "attention_len") and hasattr(m, "max_len") else 0
        what = (f"the attention's sequence length ({tokens} tokens + {extra} position(s) the model adds, "
                "e.g. a CLS token: pool='mean' adds none)" if extra > 0 else "the sequence length")
        check_divisible(f"TrainConfig(mesh={cfg.mesh!r})", what, tokens + extra, abstract, "seq")
        sequence_parallel(nnx.clone(model), abstract, axis="seq", batch_axis=batch_axis)  # refuses, changes nothing
    mesh = make_mesh(axes)
    if seq > 1:
        model = sequence_parallel(nnx.clone(model), mesh, axis="seq", batch_axis=batch_axis)
    return model, mesh
