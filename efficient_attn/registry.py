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
import functools
import importlib
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from efficient_attn import core
from efficient_attn.core import Attention, Capabilities, Dims, implements_attention

__all__ = [
    "Budget",
    "VariantSpec",
    "register",
    "build",
    "get_spec",
    "list_variants",
    "load_plugin",
    "has_parameters",
    "exact_reference",
]

ENTRY_POINT_GROUP = "efficient_attn.variants"


@dataclasses.dataclass(frozen=True)
class Budget:
    """The hyperparameter that trades cost for accuracy, and the values experiments sweep.

    knob:        a field of the variant's config (``"num_features"``, ``"window"``, ...).
    values:      increasing values to sweep.
    length_like: the knob counts tokens (a window, a rank, a block): values above the
                 sequence length are dropped.
    """

    knob: str
    values: tuple[int, ...]
    length_like: bool = False

    def __post_init__(self):
        if not isinstance(self.knob, str) or not self.knob:
            raise TypeError(f"Budget.knob must be a hyperparameter name, got {self.knob!r}")
        object.__setattr__(self, "values", tuple(self.values))
        if not self.values:
            raise ValueError(f"Budget({self.knob!r}): values must not be empty")


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """Everything known about a registered variant, without building it.

    Besides the class, its config and capabilities, a spec carries what the experiments need
    to know about the variant, so that no experiment, model or test names a variant:

    budget:          ``Budget`` swept by the approximation experiment (None: defaults only).
    pattern_setting: hyperparameters for the small (N = 64) attention-pattern picture, where
                     the defaults would cover the whole sequence.
    exact_limit:     ``n -> hyperparameters`` at which the variant equals ``full`` at length
                     ``n`` (window >= n, every block visible, ...); conformance checks it
                     forward and backward. None: no such setting.
    fast_exact:      the name of a faster variant computing the same function (``full`` ->
                     ``blockwise``); models run that one when ``fast_exact=True``.
    """

    name: str
    cls: type[Attention]
    config: type
    capabilities: Capabilities
    family: str
    citation: str
    summary: str
    budget: Budget | None = None
    pattern_setting: dict = dataclasses.field(default_factory=dict)
    exact_limit: Callable[[int], dict] | None = None
    fast_exact: str | None = None

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
    budget: Budget | None = None,
    pattern_setting: dict | None = None,
    exact_limit: Callable[[int], dict] | None = None,
    fast_exact: str | None = None,
) -> Callable[[type[Attention]], type[Attention]]:
    """Class decorator: register an ``Attention`` subclass under ``name``.

    ``config`` is a (frozen) dataclass of hyperparameters, every field with a default.
    ``family`` defaults to ``"plugin"`` for a class defined outside the package and to the
    defining module's last name component (``sparse``, ``kernel``...) inside it;
    ``citation`` defaults to the class attribute ``citation``, ``summary`` to the first line
    of the class docstring. ``budget``, ``pattern_setting``, ``exact_limit`` and
    ``fast_exact`` tell the experiments about the variant (see ``VariantSpec``); every knob
    they name must be a field of ``config``. A duplicate name is an error.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"variant name must be an identifier-like string, got {name!r}")
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise TypeError(f"register({name!r}): config must be a dataclass type, got {config!r}")
    fields = {f.name for f in dataclasses.fields(config)}
    if budget is not None:
        if not isinstance(budget, Budget):
            raise TypeError(f"register({name!r}): budget must be an efficient_attn.Budget, got {budget!r}")
        if budget.knob not in fields:
            raise ValueError(
                f"register({name!r}): budget knob {budget.knob!r} is not a field of {config.__name__} "
                f"({', '.join(sorted(fields)) or 'no fields'})"
            )
    unknown = sorted(set(pattern_setting or {}) - fields)
    if unknown:
        raise ValueError(f"register({name!r}): pattern_setting names {unknown}, not fields of {config.__name__}")
    if exact_limit is not None and not callable(exact_limit):
        raise TypeError(f"register({name!r}): exact_limit must be a function n -> hyperparameters")

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
        if not implements_attention(cls):
            raise TypeError(
                f"register({name!r}): {cls.__name__} implements neither attend(q, k, v, mask) nor __call__; "
                "define attend(self, q, k, v, mask) returning [B, T, H, Dv]"
            )
        doc = (cls.__doc__ or "").strip().splitlines()
        in_package = cls.__module__.startswith("efficient_attn.")
        spec = VariantSpec(
            name=name,
            cls=cls,
            config=config,
            capabilities=caps,
            family=family or (cls.__module__.rsplit(".", 1)[-1] if in_package else "plugin"),
            citation=citation or getattr(cls, "citation", "") or "",
            summary=summary or (doc[0] if doc else ""),
            budget=budget,
            pattern_setting=dict(pattern_setting or {}),
            exact_limit=exact_limit,
            fast_exact=fast_exact,
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
    for option in ("softcap", "sinks"):  # softmax-family options: say which variants have them
        if option in unknown and not getattr(spec.capabilities, option):
            raise core.CapabilityError(name, f"the {option!r} option", option)
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "(none)"
        raise TypeError(f"variant {name!r} has no hyperparameter(s) {', '.join(unknown)}; valid (with defaults): {valid}")
    return spec.config(**{k: _python_scalar(v) for k, v in hyperparameters.items()})


def _python_scalar(value):
    """numpy integers and floats as Python ones (configs are hashed, printed and compared with
    ``isinstance(x, int)`` by engines); bools and everything else unchanged."""
    if isinstance(value, np.integer) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def build(
    name: str,
    *,
    num_heads: int,
    head_dim: int,
    max_len: int,
    num_kv_heads: int | None = None,
    rngs: nnx.Rngs | None = None,
    **hyperparameters,
) -> Attention:
    """Construct variant ``name`` for the given sizes; ``rngs`` defaults to ``nnx.Rngs(0)``.

    ``num_kv_heads`` (default ``num_heads``) below ``num_heads`` is grouped-query attention:
    k and v then have that many heads, and the variant must have the ``gqa`` capability.
    """
    spec = get_spec(name)
    config = make_config(name, **hyperparameters)
    dims = Dims(num_heads=num_heads, head_dim=head_dim, max_len=max_len, num_kv_heads=num_kv_heads)
    if dims.num_kv_heads != dims.num_heads and not spec.capabilities.gqa:
        raise core.CapabilityError(
            name, f"grouped-query attention (num_kv_heads={dims.num_kv_heads} < num_heads={dims.num_heads})", "gqa"
        )
    if rngs is None:
        rngs = nnx.Rngs(0)
    elif not isinstance(rngs, nnx.Rngs):
        raise TypeError(
            f"build({name!r}): rngs must be a flax.nnx.Rngs, got {type(rngs).__name__} {rngs!r}; "
            f"pass rngs=nnx.Rngs({rngs!r})" if isinstance(rngs, int) else
            f"build({name!r}): rngs must be a flax.nnx.Rngs, got {type(rngs).__name__}"
        )
    module = spec.cls(config, dims, rngs=rngs)
    # A plugin whose __init__ skipped super().__init__ still gets what the base class's call needs.
    if not isinstance(getattr(module, "dims", None), Dims):
        module.dims = dims
    if getattr(module, "config", None) is None:
        module.config = config
    return module


_PROBE_DIMS = dict(num_heads=2, head_dim=8, max_len=256)


@functools.lru_cache(maxsize=None)
def _has_parameters(name: str, cls: type) -> bool:
    module = build(name, **_PROBE_DIMS, rngs=nnx.Rngs(0))
    return bool(jax.tree_util.tree_leaves(nnx.state(module, nnx.Param)))


def has_parameters(name: str) -> bool:
    """Whether variant ``name`` holds learned parameters (``nnx.Param``) at its defaults:
    derived by building it small, so a plugin needs to declare nothing."""
    return _has_parameters(name, get_spec(name).cls)


def exact_reference() -> str:
    """The ground truth of every exact path: the registered exact variant that has a fast
    exact twin (``full``, whose twin is ``blockwise``)."""
    found = [n for n in list_variants() if get_spec(n).fast_exact and get_spec(n).capabilities.exact]
    if len(found) != 1:
        raise LookupError(f"expected one exact variant declaring fast_exact, found {found}")
    return found[0]


def _variants_with(capability: str) -> list[str]:
    return [n for n in list_variants() if getattr(get_spec(n).capabilities, capability, False)]


core.set_capability_directory(_variants_with)


def load_plugin(path: str | Path) -> types.ModuleType:
    """Import the Python file at ``path`` (which registers its variants) and return it."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"plugin file not found: {path}")
    _ensure_loaded()
    if path.suffix != ".py":
        raise ValueError(f"plugin {path} is not a .py file")
    mod_name = f"efficient_attn_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    before = set(_REGISTRY)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except BaseException:
        # A failed import leaves nothing behind: no stale module, no half-registered variant,
        # so loading the fixed file again registers it.
        del sys.modules[mod_name]
        for added in set(_REGISTRY) - before:
            del _REGISTRY[added]
        raise
    return module


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (for tests and interactive sessions)."""
    _REGISTRY.pop(name, None)
