"""Built-in variants: one file per family; importing this package registers them all.

To add a built-in family, write ``variants/<family>.py`` (a config dataclass and an
``Attention`` subclass decorated with ``@register``) and add its name below. A variant may
import only ``efficient_attn.core``, ``efficient_attn.registry`` and ``efficient_attn.ops``.
A variant outside the package needs none of this: ``@register`` in any file, then
``efficient_attn.registry.load_plugin(path)`` or ``--plugin path`` on the command line.
"""

from efficient_attn.variants import (  # noqa: F401  (imported for their registrations)
    based,
    blockwise,
    delta,
    full,
    gated,
    kernel,
    learned,
    local,
    lowrank,
    lsh,
    selection,
    sparse,
    streaming,
)
