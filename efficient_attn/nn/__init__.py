"""Models around any registered attention core: multi-head attention, LRA's encoder, a causal LM.

What lives where (each file's docstring says more):

    attention.py  MultiHeadAttention: projections around a core chosen by name, grouped-query
                  heads, the fast exact twin; rotate (rotary positions)
    config.py     EncoderConfig, LMConfig and the checks they share
    conv.py       ShortConv: the causal depthwise convolution on the token embeddings
    trunk.py      Block (pre-LayerNorm) and the stack both models share; sinusoidal_table,
                  segment_positions
    tokens.py     the token-id checks (eager: an error; traced: NaN rows)
    models.py     Classifier (the LRA encoder) and CausalLM (with generate)
    decode.py     generate's program: prefill, then a scan of one-token steps

The public names are re-exported here: ``from efficient_attn.nn import CausalLM`` is the import to use.
"""

from efficient_attn.nn.attention import MultiHeadAttention, rotate
from efficient_attn.nn.config import POSITIONS, EncoderConfig, LMConfig
from efficient_attn.nn.conv import ShortConv
from efficient_attn.nn.trunk import Block, segment_positions, sinusoidal_table
from efficient_attn.nn.models import CausalLM, Classifier
from efficient_attn.nn.decode import _GENERATE_TRACES  # tests count generate's traces here

__all__ = ["MultiHeadAttention", "ShortConv", "EncoderConfig", "LMConfig", "Block", "Classifier", "CausalLM",
           "segment_positions"]
