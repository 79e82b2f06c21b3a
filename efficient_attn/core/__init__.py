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
plugin in another file gets all of it for free. ``core`` imports nothing of the package (its
files import only each other).

What lives where (each file's docstring says more; each imports only files listed above it):

    checks.py        check_config, check_positive_int
    capabilities.py  Capabilities, CapabilityError, set_capability_directory
    dims.py          Dims
    mask.py          Mask (a pytree)
    validation.py    validate_inputs, normalise_mask: what the call checks and normalises
    decode.py        DecodeState and the decoding checks that are not methods of Attention
    attention.py     Attention: the call, the decoding API, the legacy-call wrapper

The public names are re-exported here: ``from efficient_attn.core import Mask`` is the import to use.
"""

from efficient_attn.core.checks import check_config, check_positive_int
from efficient_attn.core.capabilities import Capabilities, CapabilityError, set_capability_directory
from efficient_attn.core.dims import Dims
from efficient_attn.core.mask import MASK_ARRAY_FIELDS, Mask
from efficient_attn.core.validation import normalise_mask, validate_inputs
from efficient_attn.core.decode import DecodeState
from efficient_attn.core.attention import Attention, implements_attention

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
