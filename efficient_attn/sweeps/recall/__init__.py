"""Recall against state size (Zoology, Arora et al. 2023, Fig. 2; Based, Arora et al. 2024, Fig. 2).

MQAR accuracy per key-value pair count against the memory each variant keeps per layer to
produce the next token: a KV cache's 2 N H d floats for softmax attention, a window's 2 w H d,
a recurrent state's H d d_v, ... (``state.py``: measured from the variant's decoding state
where it has one, else the KV-cache bound, labelled). Each variant is trained over model
widths (its state grows with the head width) and, where it declares a budget knob, over that
knob at a fixed width, so every family gets a curve. The finding to test (Based, Fig. 2):
fixed-size states lose recall as the pairs grow; attention, whose state grows with N, does not.

    config.py   RecallConfig, Point, points(cfg, variant)
    state.py    state_floats(variant, kwargs, ...): floats per layer, and how they were found
    presets.py  quick(), cpu(); PRESETS
    run.py      run(cfg, out): train every pending point into results/recall/<preset>/rows.jsonl
    report.py   table.md, rows.csv, rows.json, recall.png from the stored rows only
    cli.py      main(argv)

Run: ``python experiments/recall.py --preset cpu [--variants full,local,gla]``.
"""

from efficient_attn.sweeps.recall.cli import main
from efficient_attn.sweeps.recall.config import Point, RecallConfig, points
from efficient_attn.sweeps.recall.presets import PRESETS
from efficient_attn.sweeps.recall.report import markdown, write_outputs
from efficient_attn.sweeps.recall.run import run
from efficient_attn.sweeps.recall.state import state_floats

__all__ = ["RecallConfig", "Point", "points", "PRESETS", "run", "markdown", "write_outputs", "state_floats", "main"]
