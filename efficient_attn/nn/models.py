"""The models: ``Classifier`` (the Long Range Arena encoder) and ``CausalLM`` (with ``generate``).

``Classifier`` is the Long Range Arena encoder (Tay et al. 2020, "Long Range Arena: A
Benchmark for Efficient Transformers", arXiv 2011.04006; configs in the LRA repository):
token + position embeddings (``position="learned"``, the default: a trained table;
``"sinusoidal"``: the fixed sin/cos table of Vaswani et al. 2017, which LRA's model code uses
when ``learn_pos_emb=False``; ``"rotary"``: no table, queries and keys rotated by their
position before every core, RoPE of Su et al. 2021, see ``rotate``), pre-LayerNorm blocks

    x = x + Attn(LN(x));   x = x + MLP(LN(x))      MLP = Dense -> GELU -> Dense

a final LayerNorm, CLS pooling (a learned CLS vector prepended, so the attention sees
L + 1 positions) or mean pooling over real tokens, then a Dense -> ReLU -> Dense head.
``CausalLM`` is the same stack under a causal mask with a per-position vocabulary head.
Defaults are LRA's text-task sizes (4 layers, width 256, 4 heads, MLP 1024); dropout
defaults to 0 (LRA used 0.1) so that small CPU runs are deterministic and fast.

Packed rows (``CausalLM(tokens, mask, segment_ids=...)``, ``tasks/packing.py``): several
sequences share a row, ``segment_ids`` ``[B, L]`` sorted (0, 0, 1, 1, 1, 2, ...). The attention
gets ``Mask(causal=True, q_segment_ids=ids, kv_segment_ids=ids)`` (a core without the
``segments`` capability refuses); positions restart at 0 at each segment start (the learned
and sinusoidal tables and the rotary angle are indexed by the position within the segment,
``segment_positions``); the short convolution reads no token of another segment. Each
sequence's logits are then those it gets alone (tests/tasks/test_packing.py).

Masks: the token mask goes to the attention as ``Mask(kv_mask=...)`` (with ``causal=True``
in the LM), so padded keys never reach a real token. No ``q_mask`` is passed: outputs at
padded positions are never read (CLS pooling reads position 0, mean pooling gives padding
weight 0, LM targets there are ignored), so zeroing them would be work without effect.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from efficient_attn.core import CapabilityError, Mask, check_config, check_positive_int
from efficient_attn.nn.config import EncoderConfig, LMConfig
from efficient_attn.nn.conv import _apply_conv, _short_conv
from efficient_attn.nn.decode import _generate_jit
from efficient_attn.nn.tokens import _check_tokens, _embed_ids, _first_outside, _outside_rows, _poison
from efficient_attn.nn.trunk import _Trunk, segment_positions
from efficient_attn.registry import get_spec


class Classifier(nnx.Module):
    """LRA encoder classifier: tokens ``[B, L]`` (+ bool mask, True = real) -> logits ``[B, C]``.

    ``mask=None`` means every token is real, and no key mask is passed to the attention
    (for variants without ``kv_mask`` on tasks without padding).

    Token ids must be in ``[0, vocab_size)``. Called on concrete arrays, an id outside it
    raises a ``ValueError`` naming the id, its position and ``vocab_size``. Under ``jit``
    (traced ids, which cannot be checked before running) every logit of a row holding such an
    id is NaN, so that the row cannot pass for a result (a loss over it is NaN).
    """

    accepts = frozenset({"dropout_key"})  # optional keyword inputs of __call__ (see train/inputs.py)

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.trunk = _Trunk(cfg, rngs=rngs)
        if cfg.pool == "cls":
            self.cls = nnx.Param(jax.random.normal(rngs.params(), (cfg.emb_dim,)) * 0.02)
        self.head_hidden = nnx.Linear(cfg.emb_dim, cfg.mlp_dim, rngs=rngs)
        self.head_out = nnx.Linear(cfg.mlp_dim, cfg.num_classes, rngs=rngs)
        self.conv = _short_conv(cfg, rngs)

    def __call__(
        self,
        tokens: Int[Array, "B L"],
        mask: Bool[Array, "B L"] | None = None,
        *,
        dropout_key=None,
    ) -> Float[Array, "B C"]:
        cfg = self.cfg
        _check_tokens(tokens, mask, cfg.max_len, "Classifier")
        x, bad = _embed_ids(self.trunk, tokens, "Classifier")
        x = _apply_conv(self.conv, x, mask)  # on the tokens' embeddings, before the CLS vector
        B = x.shape[0]
        kv_mask = mask
        if cfg.pool == "cls":
            x = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(x.dtype), (B, 1, cfg.emb_dim)), x], axis=1)
            if mask is not None:
                kv_mask = jnp.concatenate([jnp.ones((B, 1), bool), mask], axis=1)
        h = self.trunk.run(x, Mask(kv_mask=kv_mask) if kv_mask is not None else None, dropout_key)
        if cfg.pool == "cls":
            pooled = h[:, 0]
        elif mask is None:
            pooled = h.mean(axis=1)
        else:
            w = mask.astype(h.dtype)[..., None]
            pooled = (h * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
        return self.head_out(nnx.relu(self.head_hidden(_poison(pooled, bad))))


class CausalLM(nnx.Module):
    """Causal language model: tokens ``[B, L]`` -> next-token logits ``[B, L, V]``.

    The attention gets ``Mask(causal=True, kv_mask=mask)`` (``causal=cfg.causal``: False for a
    bidirectional model, ``LMConfig``); ``mask=None`` passes no key mask.
    ``segment_ids`` ``[B, L]`` (packed rows, sorted ids): attention within a segment only,
    positions and the short convolution restarting at each segment (module docstring).

    Token ids must be in ``[0, vocab_size)`` and ``positions`` in ``[0, L)``. Called on
    concrete arrays, a value outside raises a ``ValueError`` naming it, its place and the
    bound. Under ``jit`` (traced) every logit of a row holding one is NaN, so that the row
    cannot pass for a result (a loss over it is NaN).
    """

    accepts = frozenset({"dropout_key", "positions", "segment_ids"})  # optional keyword inputs (see train/inputs.py)

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.trunk = _Trunk(cfg, rngs=rngs)
        self.head = nnx.Linear(cfg.emb_dim, cfg.num_classes, rngs=rngs)
        self.conv = _short_conv(cfg, rngs)

    def __call__(
        self,
        tokens: Int[Array, "B L"],
        mask: Bool[Array, "B L"] | None = None,
        *,
        dropout_key=None,
        positions: Int[Array, "B K"] | None = None,
        segment_ids: Int[Array, "B L"] | None = None,
    ) -> Float[Array, "B L V"] | Float[Array, "B K V"]:
        """Next-token logits at every position, or only at ``positions`` (per row): a task
        scored at a few positions per sequence (MQAR: P of L) then pays the vocabulary head
        and its softmax there only, not at all L. ``segment_ids``: packed rows (class docstring)."""
        _check_tokens(tokens, mask, self.cfg.max_len, "CausalLM")
        x, bad = _embed_ids(self.trunk, tokens, "CausalLM")
        if segment_ids is None:
            attn_mask, within = Mask(causal=self.cfg.causal, kv_mask=mask), None
        else:
            segment_ids = jnp.asarray(segment_ids)
            if tuple(segment_ids.shape) != tuple(tokens.shape) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
                raise ValueError(f"CausalLM: segment_ids must be integers of the tokens' shape {tuple(tokens.shape)}, "
                                 f"got {segment_ids.dtype}{tuple(segment_ids.shape)}; make packed rows with "
                                 "tasks.packing.pack")
            attn_mask = Mask(causal=self.cfg.causal, kv_mask=mask, q_segment_ids=segment_ids,
                             kv_segment_ids=segment_ids)
            within = segment_positions(segment_ids)
        x = _apply_conv(self.conv, x, mask, segment_ids)
        h = self.trunk.run(x, attn_mask, dropout_key, within)
        if positions is not None:
            L = tokens.shape[1]
            if positions.ndim != 2 or positions.shape[0] != tokens.shape[0]:
                raise ValueError(f"CausalLM: positions must be [B, K] with B={tokens.shape[0]}, "
                                 f"got shape {tuple(positions.shape)}")
            _first_outside(positions, L, "CausalLM", "position",
                           f"positions index the {L} tokens of a row: use values in [0, {L})")
            bad = bad | _outside_rows(positions, L)
            h = jnp.take_along_axis(h, jnp.clip(positions, 0, L - 1)[..., None].astype(jnp.int32), axis=1)
        return self.head(_poison(h, bad))

    # decoding: prefill the prompt once, then one compiled lax.scan over the new tokens

    def generate(
        self,
        prompt: Int[Array, "B P"],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        rng: jax.Array | None = None,
        *,
        mask: Bool[Array, "B P"] | None = None,
    ) -> Int[Array, "B P+N"]:
        """The prompt followed by ``max_new_tokens`` generated tokens, ``[B, P + N]``.

        Each new token is drawn from the next-token distribution given everything before it:
        ``temperature=0`` takes the argmax (greedy); otherwise ``softmax(logits / temperature)``
        restricted to the ``top_k`` most likely tokens (None: all), with ``rng`` (a
        ``jax.random`` key, required then). ``mask`` marks the prompt's real tokens (left
        padding of a batch of prompts); generated tokens are all real.

        The attention runs its decoding state API (``init_state`` with ``max_len = P + N``,
        ``prefill`` of the prompt, one ``step`` per token, capability ``decode``): the whole
        generation is one jitted program, a ``lax.scan`` over the N - 1 steps, compiled once per
        (prompt shape, N, temperature, top_k), never per token. The output equals running the
        model on the growing sequence and taking its last logits (tests/test_generate.py).
        """
        cfg = self.cfg
        spec = get_spec(cfg.attention)
        check_config("CausalLM.generate", cfg.causal,
                     "this model was built with LMConfig(causal=False): each position sees the tokens after it, "
                     "so it cannot generate one token at a time; generate with a causal model")
        if not spec.capabilities.decode:
            raise CapabilityError(cfg.attention, "generation (the decoding state API)", "decode")
        prompt = jnp.asarray(prompt)
        if mask is not None:
            mask = jnp.asarray(mask, bool)
        _check_tokens(prompt, mask, cfg.max_len, "CausalLM.generate")
        check_positive_int("CausalLM.generate", "max_new_tokens", max_new_tokens)
        total = prompt.shape[1] + int(max_new_tokens)
        check_config("CausalLM.generate", total <= cfg.max_len,
                     f"prompt of {prompt.shape[1]} + {max_new_tokens} new tokens exceeds max_len={cfg.max_len}; "
                     f"generate at most {cfg.max_len - prompt.shape[1]} tokens or build with max_len >= {total}")
        ok_t = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature >= 0
        check_config("CausalLM.generate", ok_t and np.isfinite(temperature),
                     f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None:
            check_positive_int("CausalLM.generate", "top_k", top_k)
        if temperature > 0 and rng is None:
            raise ValueError("CausalLM.generate: sampling (temperature > 0) needs rng=jax.random.key(seed)")
        _first_outside(prompt, cfg.vocab_size, "CausalLM.generate", "token id",
                       f"token ids must be in [0, vocab_size={cfg.vocab_size})")
        rng = jax.random.key(0) if rng is None else rng
        graphdef, state = nnx.split(self)
        return _generate_jit(graphdef, state, prompt, mask, rng, int(max_new_tokens), float(temperature),
                             None if top_k is None else int(top_k))
