"""The JAX peers of the peers preset: one loader each, returning the peer as
``(q, k, v, causal) -> out`` on ``[B, N, H, D]`` float32, or no function and why.

The peers come from the optional extra (``pip install -e ".[peers]"``, pinned versions), and
each is called through its documented entry point with its own defaults or documented values
(``Peer.note`` says which; every row records it):

- ``tokamax.xla`` / ``tokamax.xla_chunked``: ``tokamax.dot_product_attention(q, k, v,
  is_causal=causal, implementation=...)``, the ``jax.nn.dot_product_attention`` layout.
  ``xla_chunked`` runs with tokamax's own chunk sizes (512 queries x 1024 keys); ``xla`` has
  none. Imported as a package: its ``__init__`` works on current JAX. Its options are absl
  flags, which it parses from ``sys.argv`` on its first call when nobody has: our command
  lines' flags are not absl's (``--preset`` would be "Unknown command line flag"), so the
  loader marks absl's flags parsed first, leaving every flag at its default.
- ``memory_efficient_attention`` (Rabe & Staats 2021, ``efficient_dot_product_attention``):
  the same layout; causal through its ``mask_calc_fn`` hook, a per-chunk mask from the query
  and key offsets it passes; its default chunks (1024 queries x 4096 keys, the paper's).
  Loaded as the one file ``memory_efficient_attention/attention_jax.py`` from the installed
  package's folder, without running the package ``__init__``: that also imports the PyTorch
  version, and torch is neither needed nor installed here.
- ``ringattention`` (Liu et al. 2023, ``ring_attention``, its blockwise kernel): the same
  layout, run inside ``jax.shard_map`` on a one-device mesh (it reads its ring position and
  size from the mesh axis), so the ring has one block and what is timed is the blockwise
  kernel; causal is its ``causal_block_size=1``. Chunks of 512 queries x 512 keys (the
  README's example; clipped to N), ``float32_logits=True``, ``nothing_saveable``. Loaded as
  the one file ``ringattention/ringattention_jax.py``: the package ``__init__`` calls
  ``jax.lib.xla_bridge``, which current JAX removed, so importing the package fails.

A loader never raises: a peer not installed, or one that fails to load, comes back as
``Peer(None, reason)`` and the preset records the reason instead of a time.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Bool, Float

__all__ = ["Peer", "PeerFn", "LOADERS", "load", "first_line", "tokamax_xla", "tokamax_xla_chunked", "memory_efficient_attention",
           "ringattention"]

PeerFn = Callable[[Array, Array, Array, bool], Array]
_INSTALL = 'install the extra: pip install -e ".[peers]" (or make bench-peers)'


@dataclasses.dataclass(frozen=True)
class Peer:
    fn: PeerFn | None  # (q, k, v, causal) -> out on [B, N, H, D]; None: not available here
    note: str  # available: the settings it runs with and where they come from; else why it is not
    causal: bool = True  # whether it has a causal mode (a causal cell of a peer without one is skipped)


def _missing(package: str, why: str = "is not installed") -> Peer:
    return Peer(None, f"{package} {why}: {_INSTALL}")


def _folder(package: str) -> Path | None:
    """The installed package's folder, found without importing it (no ``__init__`` runs)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _load_file(package: str, relative: str) -> ModuleType:
    """``package/relative`` executed as a module of its own, past the package's ``__init__``
    (module docstring). Registered under a private name, so the package's own name stays free."""
    folder = _folder(package)
    path = None if folder is None else folder / relative
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{package}/{relative} is not in the installed package")
    name = f"_efficient_attn_peer.{package}.{Path(relative).stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``: how a failure is named in a row."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def _jax_file(package: str, distribution: str, relative: str) -> ModuleType | Peer:
    """The one JAX file of ``package`` (module docstring), or the missing Peer saying why not."""
    if _folder(package) is None:
        return _missing(distribution)
    try:
        return _load_file(package, relative)
    except Exception as err:  # installed but broken: recorded, not raised
        return _missing(distribution, f"did not load {relative} ({first_line(err)})")


def _tokamax(implementation: str, note: str) -> Peer:
    if importlib.util.find_spec("tokamax") is None:
        return _missing("tokamax")
    try:
        tokamax = importlib.import_module("tokamax")
        flags = importlib.import_module("absl.flags").FLAGS
    except Exception as err:  # installed but broken: recorded, not raised
        return _missing("tokamax", f"did not import ({first_line(err)})")
    if not flags.is_parsed():  # else tokamax parses sys.argv, our flags (module docstring)
        flags.mark_as_parsed()

    def attend(q: Float[Array, "B N H D"], k: Float[Array, "B N H D"], v: Float[Array, "B N H D"],
               causal: bool) -> Float[Array, "B N H D"]:
        return tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)

    return Peer(attend, note)


def tokamax_xla() -> Peer:
    """tokamax's plain XLA attention (its default on CPU)."""
    return _tokamax("xla", "tokamax.dot_product_attention(implementation='xla', is_causal=causal); no blocks")


def tokamax_xla_chunked() -> Peer:
    """tokamax's chunked XLA attention (Rabe & Staats' scheme), at tokamax's chunk sizes."""
    return _tokamax("xla_chunked", "tokamax.dot_product_attention(implementation='xla_chunked', is_causal=causal); "
                                   "chunks 512 queries x 1024 keys (tokamax's default)")


def _causal_chunk_mask(q_offset, k_offset, mask, weights: Float[Array, "B q H k"], data) -> Bool[Array, "1 q k"]:
    """memory-efficient-attention's ``mask_calc_fn``: True where the query may see the key.
    It reads the mask as ``[..., heads, q, k]``; one head broadcasts over all of them."""
    q_idx = q_offset + jnp.arange(weights.shape[-3])[:, None]
    k_idx = k_offset + jnp.arange(weights.shape[-1])[None, :]
    return (q_idx >= k_idx)[None]


def memory_efficient_attention() -> Peer:
    """Rabe & Staats' JAX code, loaded past the package ``__init__`` (it imports torch)."""
    module = _jax_file("memory_efficient_attention", "memory-efficient-attention", "attention_jax.py")
    if isinstance(module, Peer):
        return module

    def attend(q: Float[Array, "B N H D"], k: Float[Array, "B N H D"], v: Float[Array, "B N H D"],
               causal: bool) -> Float[Array, "B N H D"]:
        return module.efficient_dot_product_attention(q, k, v, mask_calc_fn=_causal_chunk_mask if causal else None)

    return Peer(attend, "efficient_dot_product_attention, causal by mask_calc_fn; chunks 1024 queries x 4096 keys "
                        "(its defaults, the paper's; clipped to N)")


_RING_CHUNK = 512  # ringattention README's query_chunk_size and key_chunk_size


def ringattention() -> Peer:
    """ringattention's blockwise kernel on a one-device mesh, loaded past the package
    ``__init__`` (it calls ``jax.lib.xla_bridge``, removed from current JAX)."""
    module = _jax_file("ringattention", "ringattention", "ringattention_jax.py")
    if isinstance(module, Peer):
        return module

    def attend(q: Float[Array, "B N H D"], k: Float[Array, "B N H D"], v: Float[Array, "B N H D"],
               causal: bool) -> Float[Array, "B N H D"]:
        n = q.shape[1]
        chunk = min(_RING_CHUNK, n)
        if n % chunk:
            raise ValueError(f"ringattention needs N divisible by its chunk {chunk}, got N={n}: use a length that "
                             f"is a multiple of {_RING_CHUNK} (or below it)")
        kwargs = dict(causal_block_size=1 if causal else None, query_chunk_size=chunk, key_chunk_size=chunk,
                      deterministic=True, dropout_rng=None, attn_pdrop=0.0, dtype=jnp.float32, precision=None,
                      policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=True)

        def body(q, k, v):  # bias, segment ids and the decoding cache index: none
            return module.ring_attention(q, k, v, None, None, None, "ring", True, kwargs)

        mesh = Mesh(np.array(jax.devices()[:1]), ("ring",))
        spec = PartitionSpec(None, "ring", None, None)
        return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)

    return Peer(attend, "ring_attention (blockwise kernel) in shard_map on a one-device mesh, causal_block_size=1 "
                        "for causal; chunks 512 queries x 512 keys (the README's example; clipped to N), "
                        "float32_logits=True, policy=nothing_saveable")


# name -> loader, in the table's column order. Looked up at run time (tests replace entries).
LOADERS: dict[str, Callable[[], Peer]] = {
    "tokamax.xla": tokamax_xla,
    "tokamax.xla_chunked": tokamax_xla_chunked,
    "memory_efficient_attention": memory_efficient_attention,
    "ringattention": ringattention,
}


def load(name: str) -> Peer:
    """The peer ``name`` (a key of ``LOADERS``), or why it is not available."""
    if name not in LOADERS:
        raise KeyError(f"unknown peer {name!r}; the peers are {', '.join(LOADERS)}")
    return LOADERS[name]()
