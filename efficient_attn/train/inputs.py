"""What a model is given, and what it must take: its optional inputs (``model_accepts``) against
what a task needs (``needs_kv_mask``, ``scored_positions``, ``packed``), checked before
anything is compiled (``_check_data``, ``_check_packing``).

What a model must offer: ``model(tokens, mask)`` -> logits (``[B, C]`` for a classification
task, ``[B, L, V]`` for a token task), and a class attribute ``accepts``, the set of optional
keyword inputs it takes (``nn.Classifier`` and ``nn.CausalLM`` declare theirs):

    "dropout_key"   a PRNG key for dropout (passed only when the model's ``cfg.dropout`` > 0)
    "positions"     ``[B, K]`` int: logits only at those positions, ``[B, K, V]`` (a token task
                    scored at few positions then pays the vocabulary head there only)
    "segment_ids"   ``[B, L]`` int: the rows are packed (``tasks/packing.py``); the model keeps
                    every segment to itself (attention, positions, convolution)

A model that declares none of them is called with ``(tokens, mask)`` alone.

Packed data (splits with ``segment_ids``): the batches carry the ids, passed to a model that
accepts ``segment_ids``. A model that does not, or whose attention cores lack the ``segments``
capability, is refused before anything is compiled (it would let packed sequences see each
other): train such a model on the unpacked task (pack=False). The loss is the mean over scored
tokens, as unpacked: the token-weighted mean of the packed examples' losses.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from efficient_attn.core import Attention, CapabilityError
from efficient_attn.tasks.base import IGNORE, TaskData
from efficient_attn.train.config import TrainConfig


def needs_kv_mask(data: TaskData) -> bool:
    """Whether a model on ``data`` needs the key padding mask to be right.

    False when no split has padding, or when the task is causal and every sequence is
    right-padded (a real query then never sees a later, padded key).
    """
    for split in (data.train, data.val, data.test):
        m = np.asarray(split.mask, bool)
        if m.all():
            continue
        if data.causal and (np.diff(m.astype(np.int8), axis=1) <= 0).all():
            continue  # right padding only: causal attention never reaches it
        return True
    return False


def scored_positions(data: TaskData) -> int | None:
    """For a token task scored at few positions per row (at most half of them, as MQAR's P of
    L): the most scored positions any row has, K. Training then computes the vocabulary head
    at K gathered positions per row instead of all L (same loss, same gradients: the other
    positions carry zero weight). None for classification and densely scored tasks."""
    if data.kind != "token":
        return None
    k = max(int((np.asarray(s.targets) != IGNORE).sum(axis=1).max(initial=0)) for s in (data.train, data.val, data.test))
    L = int(np.asarray(data.train.targets).shape[1])
    return max(k, 1) if k <= L // 2 else None


KNOWN_INPUTS = frozenset({"dropout_key", "positions", "segment_ids"})


def model_accepts(model: nnx.Module) -> frozenset[str]:
    """The optional keyword inputs ``model`` declares in its class attribute ``accepts``
    (module docstring); none declared = ``(tokens, mask)`` only."""
    accepts = getattr(type(model), "accepts", frozenset())
    if not isinstance(accepts, (frozenset, set)) or not all(isinstance(a, str) for a in accepts):
        raise TypeError(
            f"{type(model).__name__}.accepts must be a frozenset of input names such as {sorted(KNOWN_INPUTS)}, "
            f"got {accepts!r}"
        )
    return frozenset(accepts)


def packed(data: TaskData) -> bool:
    """Whether any split of ``data`` holds packed rows (``segment_ids``)."""
    return any(getattr(data, s).segment_ids is not None for s in ("train", "val", "test"))


def _check_data(model: nnx.Module, data: TaskData, cfg: TrainConfig, use_mask: bool) -> None:
    if data.kind not in ("classify", "token"):
        raise ValueError(f"task {data.name!r}: unknown kind {data.kind!r} (expected 'classify' or 'token')")
    if not use_mask and needs_kv_mask(data):
        raise ValueError(
            f"task {data.name!r} has padding that a model without the key mask would attend to; "
            "train with use_mask=True (and a variant whose capabilities include kv_mask)"
        )
    for split_name in ("train", "val", "test"):
        if len(getattr(data, split_name)) == 0:
            raise ValueError(f"task {data.name!r}: the {split_name} split is empty")
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab is not None and data.vocab_size > vocab:
        raise ValueError(
            f"task {data.name!r} has token ids up to vocab_size={data.vocab_size} but {type(model).__name__} "
            f"embeds only {vocab}; build the model with vocab_size={data.vocab_size}"
        )
    if cfg.mesh is None and cfg.eval_batch % len(jax.devices()):  # with a mesh: TrainConfig checked "data"
        raise ValueError(f"eval batch {cfg.eval_batch} must be divisible by {len(jax.devices())} devices")


def _check_packing(model: nnx.Module, data: TaskData) -> None:
    """Packed data needs a model that accepts ``segment_ids`` and attention cores with the
    ``segments`` capability; refused here, before compiling, naming the fix."""
    if not packed(data):
        return
    if "segment_ids" not in model_accepts(model):
        raise ValueError(f"task {data.name!r} is packed (segment_ids) but {type(model).__name__} does not accept "
                         "segment_ids (its class attribute `accepts`), so packed sequences would see each other; "
                         "train on the unpacked task (pack=False) or use a model that accepts them (nn.CausalLM)")
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Attention) and not node.capabilities.segments:
            raise CapabilityError(node.variant_name, f"packed training on {data.name!r} (Mask segment ids; train on the "
                                        "unpacked task instead: pack=False)", "segments")
