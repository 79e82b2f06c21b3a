"""What a variant declares it can honour (``Capabilities``), and the error when it is asked
for more (``CapabilityError``).

``CapabilityError`` lists the registered variants that have the missing capability; it asks
the registry through ``set_capability_directory`` (installed by ``registry`` when imported), so
that ``core`` never imports ``registry``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


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
