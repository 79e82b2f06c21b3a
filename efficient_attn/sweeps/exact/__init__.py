"""The exact experiment: exact attention side by side, and the encoder built on it.

Two parts, one package:

- the kernel benchmark (``experiments/bench_exact.py``, the first step of ``make
  reproduce``): ``full`` (the readable einsum), ``blockwise`` (the online-softmax kernel) and
  ``jax.nn.dot_product_attention``, float32, B=1, H=8, D=64 by default. Forward and
  forward+backward time at each N with blockwise's speed-ups and its fraction of this
  machine's matmul rate; compiled memory of forward+backward at 16K (compile only); causal
  against non-causal blockwise at 8K; with ``--preset huge`` one forward+backward call of
  blockwise at N = 65536. Writes ``results/exact/`` (``results/exact/huge/``). With ``--preset
  peers`` (``make bench-peers``, the optional extra ``peers``): blockwise against
  ``jax.nn.dot_product_attention`` and the JAX peers (tokamax ``xla`` and ``xla_chunked``,
  memory-efficient-attention, ringattention's blockwise kernel), each checked against
  ``full`` before it is timed, causal and not, N = 1K-8K; writes ``results/exact/peers/``.
- the encoder throughput (``experiments/bench_encoder.py``): training and forward tokens per
  second of the ``full`` encoder against the same model on ``flax.nnx.MultiHeadAttention``.
  Writes ``results/exact/encoder/``.

Each unit is one row of a RowStore (``rows.jsonl``), appended when it finishes, so a killed
run resumes; the programs a row compares are timed in the same interleaved rounds (warm-up,
``block_until_ready``, medians), so its ratios never mix two runs. The tables are rebuilt
from the stored rows only (``--report-only`` does only that).

The package, one concept a module:

    config.py          ExactConfig, EncoderBenchConfig (frozen dataclasses)
    presets.py         quick(), huge(), peers(), encoder_quick(): the named factories (PRESETS, ENCODER_PRESETS)
    programs.py        the three implementations, forward+backward, inputs, FLOPs, the matmul yardstick
    timing.py          interleaved rounds of compiled programs
    units.py           the units of a config, their keys, measuring one into a row
    peers.py           the JAX peers: one loader each (past the package __init__ where it breaks)
    peer_rows.py       a peers row: every implementation checked against full, then timed together
    run.py             the sweep into the RowStore (resumable, errors recorded)
    report.py          table.md and rows.json from stored rows only
    peer_report.py     the peers preset's table.md from its stored rows only
    encoder.py         the encoder models, their measured row, its run
    encoder_report.py  the encoder table from its stored row only
    cli.py             ``main(argv)`` and ``encoder_main(argv)``: the command lines

    python experiments/bench_exact.py                 # about 2 minutes on 2 cores
    python experiments/bench_exact.py --huge          # adds N=65536 forward+backward (minutes)
    make bench-peers                                  # the peers preset, extra installed (<= 15 minutes)
    python experiments/bench_encoder.py               # about a minute
"""

from efficient_attn.sweeps.exact.cli import (config_from_args, encoder_config_from_args, encoder_main,
                                             encoder_parse_args, main, parse_args)
from efficient_attn.sweeps.exact.config import EncoderBenchConfig, ExactConfig
from efficient_attn.sweeps.exact.presets import ENCODER_PRESETS, PRESETS
from efficient_attn.sweeps.exact.programs import attention_flops
from efficient_attn.sweeps.exact.report import markdown, write_outputs
from efficient_attn.sweeps.exact.run import rows_of, run

__all__ = ["ExactConfig", "EncoderBenchConfig", "PRESETS", "ENCODER_PRESETS", "attention_flops", "run", "rows_of",
           "markdown", "write_outputs", "main", "parse_args", "config_from_args", "encoder_main",
           "encoder_parse_args", "encoder_config_from_args"]
