"""Device meshes for sequence parallelism: ``data=2,seq=4`` parsed, built and checked.

A mesh names the axes of a grid of devices (``jax.sharding.Mesh``). Sequence parallelism
splits the sequence axis of q, k, v over one mesh axis (by convention ``"seq"``); the batch
may be split over another (``"data"``), so a ``data=2,seq=4`` mesh runs 2 data-parallel
replicas, each spreading its sequences over 4 devices.

Everything that can be wrong with a request is refused here with the problem and the fix
named: a malformed spec, a device count that does not match, an axis the mesh does not
have, a length that the axis does not divide.

``collective_bytes`` reads a program (a jaxpr) and adds up the bytes each device sends in
its collectives, so that communication volumes in tables are read off the program that
runs, not only computed from a formula (tests check the two agree).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.extend import core as jex_core
from jax.sharding import AbstractMesh, Mesh

__all__ = [
    "parse_mesh",
    "make_mesh",
    "format_mesh",
    "axis_size",
    "check_divisible",
    "collective_bytes",
]

_AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,seq=4"`` -> ``{"data": 2, "seq": 4}`` (order kept: the device grid's order).

    Refused with the reason: an empty spec, a part without ``=``, a name that is not an
    identifier, a size that is not a positive integer, an axis named twice.
    """
    if not isinstance(text, str):
        raise TypeError(f"mesh spec must be a string like 'data=2,seq=4', got {type(text).__name__}")
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"mesh spec {text!r} is empty; write axis=size pairs, e.g. 'data=2,seq=4'")
    axes: dict[str, int] = {}
    for part in parts:
        name, eq, size = (s.strip() for s in part.partition("="))
        if not eq:
            raise ValueError(f"mesh spec {text!r}: {part!r} is not axis=size; write e.g. 'data=2,seq=4'")
        if not _AXIS_NAME.match(name):
            raise ValueError(f"mesh spec {text!r}: axis name {name!r} is not an identifier (letters, digits, _)")
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"mesh spec {text!r}: size of axis {name!r} must be a positive integer, got {size!r}")
        if name in axes:
            raise ValueError(f"mesh spec {text!r}: axis {name!r} is named twice")
        axes[name] = int(size)
    return axes


def format_mesh(axes: Mapping[str, int]) -> str:
    """The inverse of ``parse_mesh``: ``{"data": 2, "seq": 4}`` -> ``"data=2,seq=4"``."""
    return ",".join(f"{k}={v}" for k, v in axes.items())


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` of ``devices`` (default: all of ``jax.devices()``) shaped by ``spec``.

    The sizes must multiply to the number of devices; fewer devices than the product is
    refused with the fix (on a CPU, simulated devices must be requested before jax starts).
    A mesh over a subset is built by passing ``devices=jax.devices()[:n]``.
    """
    axes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    for name, size in axes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"mesh axis {name!r}: size must be a positive integer, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    need = int(np.prod(list(axes.values()), dtype=np.int64)) if axes else 1
    if need != len(devices):
        have = len(devices)
        fix = (f"on a CPU, simulate {need} devices by setting XLA_FLAGS=--xla_force_host_platform_device_count={need} "
               "before jax is imported" if need > have else
               f"pass devices=jax.devices()[:{need}] to use a subset")
        raise ValueError(f"mesh {format_mesh(axes)} needs {need} devices, got {have}: {fix}, "
                         f"or choose sizes whose product is {have}")
    return Mesh(np.array(devices, dtype=object).reshape(tuple(axes.values())), tuple(axes))


def axis_size(mesh: Mesh, axis: str | None, *, who: str = "sequence parallelism") -> int:
    """The number of devices along ``axis`` (1 for ``None``); an axis the mesh lacks is refused."""
    if axis is None:
        return 1
    if not isinstance(mesh, (Mesh, AbstractMesh)):  # an AbstractMesh traces (make_jaxpr) without devices
        raise TypeError(f"{who}: mesh must be a jax.sharding.Mesh (see efficient_attn.parallel.make_mesh), "
                        f"got {type(mesh).__name__}")
    if axis not in mesh.shape:
        raise ValueError(f"{who}: mesh axis {axis!r} does not exist; this mesh has axes "
                         f"{format_mesh(dict(mesh.shape))}: pass one of {list(mesh.shape)} or build the mesh "
                         f"with it (make_mesh('{axis}=N,...'))")
    return int(mesh.shape[axis])


def check_divisible(who: str, what: str, length: int, mesh: Mesh, axis: str, *, parts_per_device: int = 1) -> int:
    """Refuse a ``length`` that ``parts_per_device`` x the size of ``axis`` does not divide.

    Returns the length each device holds. The message names both numbers and the fix (pad
    to the next multiple, or a mesh axis that divides it).
    """
    p = axis_size(mesh, axis, who=who)
    parts = p * parts_per_device
    if length % parts:
        up = -(-length // parts) * parts
        split = f"{parts_per_device} chunks on each of {p}" if parts_per_device > 1 else f"{p}"
        divisors = [d for d in range(1, min(length, 64) + 1) if length % (d * parts_per_device) == 0]
        raise ValueError(
            f"{who}: {what} = {length} is not divisible by {parts} ({split} devices along mesh axis {axis!r}); "
            f"pad the sequence to {up} (masking the padding with kv_mask), or use a {axis!r} axis size "
            f"among {divisors}"
        )
    return length // p


# ------------------------------------------------------------------ communication of a program

_SENDS = {"ppermute", "all_gather", "psum", "pmax", "pmin", "all_to_all", "reduce_scatter", "psum_scatter",
          "psum_invariant"}


def _bytes(aval) -> int:
    return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def _sub_jaxprs(params: dict):
    for value in params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def collective_bytes(jaxpr) -> dict[str, int]:
    """Bytes each device hands to each kind of collective in ``jaxpr`` (a ``ClosedJaxpr`` from
    ``jax.make_jaxpr``; inside ``shard_map`` shapes are per device), loops counted by their
    trip count.

    The operand size is what one device contributes: for a ``ppermute`` exactly what it
    sends; for an ``all_gather`` or ``psum`` the payload (a ring implementation sends about
    (P - 1) / P of it twice for a psum). A ``cond`` counts its costliest branch. A
    ``while`` loop has no static trip count and is refused.
    """
    totals: dict[str, int] = {}

    def walk(jx, times: int):
        for eqn in jx.eqns:
            name = eqn.primitive.name
            if name in _SENDS:
                totals[name] = totals.get(name, 0) + times * sum(_bytes(v.aval) for v in eqn.invars)
                continue
            if name == "while" and any(e.primitive.name in _SENDS for e in _all_eqns(eqn.params["body_jaxpr"].jaxpr)):
                raise ValueError("collective_bytes: a collective inside a while loop has no static trip count")
            if name == "cond":
                best: dict[str, int] = {}
                for branch in eqn.params["branches"]:
                    sub = collective_bytes(branch)
                    if sum(sub.values()) > sum(best.values()):
                        best = sub
                for k, b in best.items():
                    totals[k] = totals.get(k, 0) + times * b
                continue
            inner = times * int(eqn.params["length"]) if name == "scan" else times
            for sub in _sub_jaxprs(eqn.params):
                walk(sub, inner)

    walk(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr, 1)
    return totals


def _all_eqns(jx):
    for eqn in jx.eqns:
        yield eqn
        for sub in _sub_jaxprs(eqn.params):
            yield from _all_eqns(sub)
