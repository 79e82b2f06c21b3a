"""The registry: ``register``, ``build``, ``get_spec``, ``list_variants``, plugin loading.

A variant is registered once, by name, with its config dataclass:

    @ea.register("my_attention", config=MyConfig)
    class MyAttention(ea.Attention):
        capabilities = ea.Capabilities(causal=True, ...)

Built-in variants live in ``efficient_attn/variants/`` and are imported on first use.
Installed packages add variants through the entry-point group ``efficient_attn.variants``
(each entry point names a module to import, or a callable to call). ``load_plugin(path)``
imports one Python file, which registers what it defines.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, Callable

from flax import nnx

from efficient_attn.core import Attention, Capabilities, Dims

__all__ = ["VariantSpec", "register", "build", "get_spec", "list_variants", "load_plugin"]

ENTRY_POINT_GROUP = "efficient_attn.variants"


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """Everything known about a registered variant, without building it."""

    name: str
    cls: type[Attention]
    config: type
    capabilities: Capabilities
    family: str
    citation: str
    summary: str

    def defaults(self) -> dict[str, Any]:
        """Hyperparameter names and their default values (``MISSING`` when required)."""
        out = {}
        for f in dataclasses.fields(self.config):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
            else:
                out[f.name] = dataclasses.MISSING
        return out


_REGISTRY: dict[str, VariantSpec] = {}
_builtins_loaded = False
_entry_points_loaded = False


def register(
    name: str,
    *,
    config: type,
    family: str | None = None,
    citation: str | None = None,
    summary: str | None = None,
) -> Callable[[type[Attention]], type[Attention]]:
    """Class decorator: register an ``Attention`` subclass under ``name``.

    ``config`` is a (frozen) dataclass of hyperparameters, every field with a default.
    ``family`` defaults to the defining module's last name component (``sparse``,
    ``kernel``...), ``citation`` to the class attribute ``citation``, ``summary`` to the
    first line of the class docstring. A duplicate name is an error.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"variant name must be an identifier-like string, got {name!r}")
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise TypeError(f"register({name!r}): config must be a dataclass type, got {config!r}")

    def decorator(cls: type[Attention]) -> type[Attention]:
        if not (isinstance(cls, type) and issubclass(cls, Attention)):
            raise TypeError(f"register({name!r}): {cls!r} must subclass efficient_attn.Attention")
        if name in _REGISTRY:
            raise ValueError(
                f"variant {name!r} is already registered (by {_REGISTRY[name].cls.__module__}."
                f"{_REGISTRY[name].cls.__qualname__}); choose another name"
            )
        caps = cls.capabilities
        if not isinstance(caps, Capabilities):
            raise TypeError(f"register({name!r}): {cls.__name__}.capabilities must be a Capabilities")
        doc = (cls.__doc__ or "").strip().splitlines()
        spec = VariantSpec(
            name=name,
            cls=cls,
            config=config,
            capabilities=caps,
            family=family or cls.__module__.rsplit(".", 1)[-1],
            citation=citation or getattr(cls, "citation", "") or "",
            summary=summary or (doc[0] if doc else ""),
        )
        cls.variant_name = name
        _REGISTRY[name] = spec
        return cls

    return decorator


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("efficient_attn.variants")


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if callable(obj) and not isinstance(obj, types.ModuleType):
            obj()


def _ensure_loaded() -> None:
    _load_builtins()
    _load_entry_points()


def list_variants() -> list[str]:
    """Sorted names of every registered variant (built-ins, entry points, plugins)."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_spec(name: str) -> VariantSpec:
    """The ``VariantSpec`` of ``name``; an unknown name suggests the close ones."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise KeyError(
            f"unknown attention variant {name!r}; {hint}registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def make_config(name: str, **hyperparameters):
    """The config dataclass of ``name`` filled with ``hyperparameters`` (unknown ones rejected)."""
    spec = get_spec(name)
    defaults = spec.defaults()
    unknown = sorted(set(hyperparameters) - set(defaults))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "(none)"
        raise TypeError(f"variant {name!r} has no hyperparameter(s) {', '.join(unknown)}; valid (with defaults): {valid}")
    return spec.config(**hyperparameters)


def build(
    name: str,
    *,
    num_heads: int,
    head_dim: int,
    max_len: int,
    rngs: nnx.Rngs | None = None,
    **hyperparameters,
) -> Attention:
    """Construct variant ``name`` for the given sizes; ``rngs`` defaults to ``nnx.Rngs(0)``."""
    spec = get_spec(name)
    config = make_config(name, **hyperparameters)
    dims = Dims(num_heads=num_heads, head_dim=head_dim, max_len=max_len)
    return spec.cls(config, dims, rngs=rngs if rngs is not None else nnx.Rngs(0))


def load_plugin(path: str | Path) -> types.ModuleType:
    """Import the Python file at ``path`` (which registers its variants) and return it."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"plugin file not found: {path}")
    _ensure_loaded()
    mod_name = f"efficient_attn_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (for tests and interactive sessions)."""
    _REGISTRY.pop(name, None)
