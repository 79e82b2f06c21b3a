"""Built-in variants: one file per family; importing this package registers them all.

To add a built-in family, write ``variants/<family>.py`` (a config dataclass and an
``Attention`` subclass decorated with ``@register``) and import it below. A variant may
import only ``efficient_attn.core``, ``efficient_attn.registry`` and ``efficient_attn.ops``.
"""

import importlib

_FAMILIES = ["full", "blockwise", "local", "sparse", "lowrank", "kernel", "lsh", "learned"]

for _family in _FAMILIES:
    try:
        importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as err:  # a family not written yet
        if err.name != f"{__name__}.{_family}":
            raise
