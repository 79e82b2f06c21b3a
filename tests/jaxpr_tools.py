"""Test helpers that read a function's jaxpr."""

import jax
import numpy as np


def max_intermediate_elems(fn, *args):
    """Largest array produced anywhere in the jaxpr of fn (sub-jaxprs included)."""
    biggest = 0

    def walk(jaxpr):
        nonlocal biggest
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                shape = getattr(var.aval, "shape", ())
                biggest = max(biggest, int(np.prod(shape)) if shape else 1)
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        walk(getattr(inner, "jaxpr", inner))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return biggest
