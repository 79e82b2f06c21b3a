"""The models' configs: ``EncoderConfig`` (the LRA classifier) and ``LMConfig`` (the causal LM).

Frozen dataclasses, checked at construction (``_check_model_config``: the checks both share).
What the fields do is said where they act: sizes, pooling and positions in ``models.py``,
``fast_exact`` and ``num_kv_heads`` in ``attention.py``, ``short_conv`` in ``conv.py``.
"""

from __future__ import annotations

import dataclasses

from efficient_attn.core import CapabilityError, check_config, check_positive_int
from efficient_attn.nn.attention import _check_kv_heads
from efficient_attn.registry import get_spec


POSITIONS = ("sinusoidal", "learned", "rotary")


def _check_model_config(cfg: EncoderConfig | LMConfig) -> None:
    """The checks both model configs share (sizes, dropout, attention and its kwargs, fast
    path, positions); a dict of ``attention_kwargs`` is stored as sorted (name, value) pairs
    so that the frozen config stays hashable."""
    name = type(cfg).__name__
    if cfg.num_kv_heads is None:
        object.__setattr__(cfg, "num_kv_heads", cfg.num_heads)
    for field in ("vocab_size", "max_len", "num_classes", "num_layers", "emb_dim", "num_heads", "mlp_dim",
                  "num_kv_heads"):
        check_positive_int(name, field, getattr(cfg, field))
    _check_kv_heads(name, cfg.num_heads, cfg.num_kv_heads)
    check_config(name, cfg.emb_dim % cfg.num_heads == 0,
                 f"emb_dim={cfg.emb_dim} must be divisible by num_heads={cfg.num_heads}")
    check_config(name, isinstance(cfg.dropout, (int, float)) and 0.0 <= cfg.dropout < 1.0,
                 f"dropout must be in [0, 1), got {cfg.dropout!r}")
    if isinstance(cfg.attention_kwargs, dict):
        object.__setattr__(cfg, "attention_kwargs", tuple(sorted(cfg.attention_kwargs.items())))
    check_config(name, all(isinstance(p, tuple) and len(p) == 2 for p in cfg.attention_kwargs),
                 f"attention_kwargs must be a tuple of (name, value) pairs, got {cfg.attention_kwargs!r}")
    check_config(name, isinstance(cfg.fast_exact, bool), f"fast_exact must be True or False, got {cfg.fast_exact!r}")
    check_config(name, cfg.position in POSITIONS, f"position must be one of {POSITIONS}, got {cfg.position!r}")
    check_config(name, isinstance(cfg.short_conv, int) and not isinstance(cfg.short_conv, bool) and cfg.short_conv >= 0,
                 f"short_conv is a kernel size (0 = no short convolution, else e.g. 3 or 4), got {cfg.short_conv!r}")
    spec = get_spec(cfg.attention)  # unknown variant: fail now, with the registered names
    if cfg.num_kv_heads != cfg.num_heads and not spec.capabilities.gqa:
        raise CapabilityError(cfg.attention, f"grouped-query attention (num_kv_heads={cfg.num_kv_heads} < "
                                             f"num_heads={cfg.num_heads})", "gqa")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Sizes of the LRA encoder classifier (defaults: LRA's text task).

    ``max_len`` is the longest token sequence (without the CLS token, which the model adds).
    ``attention_kwargs`` is a tuple of ``(name, value)`` pairs so that the config stays
    hashable; ``pool`` is ``"cls"`` or ``"mean"``.
    """

    vocab_size: int
    max_len: int
    num_classes: int
    num_layers: int = 4
    emb_dim: int = 256
    num_heads: int = 4
    mlp_dim: int = 1024
    pool: str = "cls"
    attention: str = "full"
    attention_kwargs: tuple = ()
    dropout: float = 0.0
    fast_exact: bool = True  # run on the variant's fast exact twin, if it has one (nn/attention.py)
    position: str = "learned"  # or "sinusoidal" or "rotary" (see nn/models.py)
    short_conv: int = 0  # kernel of the causal depthwise convolution on the embeddings; 0 = none
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = num_heads

    def __post_init__(self):
        _check_model_config(self)
        check_config(type(self).__name__, self.pool in ("cls", "mean"), f"pool must be 'cls' or 'mean', got {self.pool!r}")

    @property
    def attention_len(self) -> int:
        """Positions the attention sees: ``max_len`` plus the CLS token when pooling by CLS."""
        return self.max_len + (1 if self.pool == "cls" else 0)


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Sizes of the causal language model (``num_classes`` = output vocabulary, default input's).

    ``causal=False`` runs the attention without the causal mask: a bidirectional-only variant
    (Linformer, Nystromformer) on a task whose layout cannot leak an answer to a look-ahead
    (``tasks.bidirectional_safe``: MQAR's values never follow their query). Such a model
    predicts at positions it can see the whole row from, so it cannot ``generate``.
    """

    vocab_size: int
    max_len: int
    num_classes: int | None = None
    num_layers: int = 4
    emb_dim: int = 256
    num_heads: int = 4
    mlp_dim: int = 1024
    attention: str = "full"
    attention_kwargs: tuple = ()
    dropout: float = 0.0
    fast_exact: bool = True  # run on the variant's fast exact twin, if it has one (nn/attention.py)
    position: str = "learned"  # or "sinusoidal" or "rotary" (see nn/models.py)
    short_conv: int = 0  # kernel of the causal depthwise convolution on the embeddings; 0 = none
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = num_heads
    causal: bool = True  # False: the attention sees the whole row (class docstring)

    def __post_init__(self):
        if self.num_classes is None:
            object.__setattr__(self, "num_classes", self.vocab_size)
        _check_model_config(self)
        caps = get_spec(self.attention).capabilities
        check_config(type(self).__name__, isinstance(self.causal, bool), f"causal must be a bool, got {self.causal!r}")
        if self.causal:
            check_config(type(self).__name__, caps.causal,
                         f"variant {self.attention!r} cannot do causal masking, which a causal LM needs; "
                         "causal=False runs it bidirectionally, only for a task whose layout cannot leak its answers")
        else:
            check_config(type(self).__name__, caps.bidirectional,
                         f"causal=False needs a variant that can attend bidirectionally; {self.attention!r} is "
                         "causal-only (capabilities.bidirectional=False)")

    @property
    def attention_len(self) -> int:
        return self.max_len
