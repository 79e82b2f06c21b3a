"""``CausalLM.generate``'s program: prefill the prompt once, then a ``lax.scan`` of decoding steps.

The LM's layers one token at a time, over the attention's decoding state (``Attention.
init_state / prefill / step``). Each function mirrors the forward pass it decodes: the
same projections, rotary angle of the token's position, position embedding, short
convolution over the K - 1 previous embeddings, blocks, final norm and head.

``_lm_prefill`` runs the prompt and makes the states, ``_lm_step`` takes one more token;
``_generate`` is the whole generation, under ``jax.jit`` as ``_generate_jit``, which
``CausalLM.generate`` calls after its checks. ``lm`` is that ``CausalLM``, named in the
annotations as a string only: ``models.py`` imports this module, not the other way round.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from efficient_attn.core import Mask
from efficient_attn.nn.attention import MultiHeadAttention, rotate
from efficient_attn.nn.conv import ShortConv, _apply_conv
from efficient_attn.nn.tokens import _embed_ids, _poison
from efficient_attn.nn.trunk import Block, _Trunk


_GENERATE_TRACES = {"count": 0}  # incremented when generate's program is traced (tests count compiles)


def _mha_prefill(mha: MultiHeadAttention, x, mask: Mask, state):
    q, k, v = mha.qkv(x)
    if mha.rotary:
        q, k = rotate(q, jnp.arange(q.shape[1])), rotate(k, jnp.arange(k.shape[1]))
    out, state = mha.core.prefill(q, k, v, state, mask=mask)
    return mha.out(out), state


def _mha_step(mha: MultiHeadAttention, x_t, state):
    q, k, v = mha.qkv(x_t)
    if mha.rotary:
        where = state.position[None]
        q, k = rotate(q, where), rotate(k, where)
    out, state = mha.core.step(q, k, v, state)
    return mha.out(out), state


def _block_decode(block: Block, x, attend):
    """``Block.__call__`` without dropout, the attention given as ``attend(h) -> (out, state)``."""
    a, state = attend(block.ln1(x))
    x = x + a
    return x + block.mlp_out(nnx.gelu(block.mlp_in(block.ln2(x)))), state


def _positions(trunk: _Trunk, x, positions):
    if trunk.cfg.position == "learned":
        return x + trunk.pos(positions)[None]
    if trunk.cfg.position == "sinusoidal":
        return x + trunk.pos_table[...][positions][None]
    return x  # rotary: in the attention


def _conv_tail(x, mask, kernel: int):
    """The K - 1 last (masked) embeddings the short convolution reads next, zeros before the start."""
    if mask is not None:
        x = jnp.where(mask[..., None], x, 0.0).astype(x.dtype)
    keep = kernel - 1
    x = jnp.pad(x, ((0, 0), (keep, 0), (0, 0)))
    return x[:, x.shape[1] - keep:]


def _conv_step(conv: ShortConv, x_t, tail):
    """``ShortConv`` at one position: (y_t [B, 1, F], the new tail)."""
    w = conv.kernel[...].astype(x_t.dtype)
    window = jnp.concatenate([tail, x_t], axis=1)  # x_{t-K+1} .. x_t
    K = w.shape[0]
    mixed = sum(w[j] * window[:, K - 1 - j : K - j] for j in range(K))
    return x_t + mixed + conv.bias[...].astype(x_t.dtype), window[:, 1:]


def _lm_prefill(lm: "CausalLM", tokens, mask, total: int):
    """Logits at the prompt's last position and the decoding states (attention, convolution)."""
    x, bad = _embed_ids(lm.trunk, tokens, "CausalLM.generate")
    tail = None if lm.conv is None else _conv_tail(x, mask, lm.conv.kernel.shape[0])
    x = _apply_conv(lm.conv, x, mask)
    x = _positions(lm.trunk, x, jnp.arange(x.shape[1]))
    attn_mask = Mask(causal=True, kv_mask=mask)
    states = []
    for block in lm.trunk.blocks:
        empty = block.attn.core.init_state(x.shape[0], max_len=total, dtype=x.dtype)
        x, s = _block_decode(block, x, lambda h, b=block, e=empty: _mha_prefill(b.attn, h, attn_mask, e))
        states.append(s)
    logits = lm.head(_poison(lm.trunk.ln_f(x[:, -1:]), bad))[:, 0]
    return logits, (states, tail, bad)


def _lm_step(lm: "CausalLM", token, carry):
    """Logits after one more token [B], and the carried states."""
    states, tail, bad = carry
    x, _ = _embed_ids(lm.trunk, token[:, None], "CausalLM.generate")
    if lm.conv is not None:
        x, tail = _conv_step(lm.conv, x, tail)
    x = _positions(lm.trunk, x, states[0].position[None])
    new = []
    for block, s in zip(lm.trunk.blocks, states):
        x, s = _block_decode(block, x, lambda h, b=block, s=s: _mha_step(b.attn, h, s))
        new.append(s)
    logits = lm.head(_poison(lm.trunk.ln_f(x), bad))[:, 0]
    return logits, (new, tail, bad)


def _sample(logits: Float[Array, "B V"], temperature: float, top_k: int | None, key) -> Int[Array, " B"]:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = jax.lax.top_k(z, top_k)[0][:, -1:]
        z = jnp.where(z >= kth, z, -jnp.inf)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


def _generate(graphdef, state, prompt, mask, rng, max_new_tokens: int, temperature: float, top_k: int | None):
    _GENERATE_TRACES["count"] += 1
    lm = nnx.merge(graphdef, state, copy=True)
    total = prompt.shape[1] + max_new_tokens
    logits, carry = _lm_prefill(lm, prompt, mask, total)
    keys = jax.random.split(rng, max_new_tokens)
    first = _sample(logits, temperature, top_k, keys[0])

    def one(c, key):
        token, carry = c
        logits, carry = _lm_step(lm, token, carry)
        nxt = _sample(logits, temperature, top_k, key)
        return (nxt, carry), nxt

    _, rest = jax.lax.scan(one, (first, carry), keys[1:])
    new = jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)
    return jnp.concatenate([prompt.astype(jnp.int32), new], axis=1)


_generate_jit = jax.jit(_generate, static_argnums=(0, 5, 6, 7))
