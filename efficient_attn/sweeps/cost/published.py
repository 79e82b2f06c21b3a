"""LRA's published Table 2, the citation the cost experiment's Table 2 analog stands beside.

Tay et al. 2020, "Long Range Arena: A Benchmark for Efficient Transformers", arXiv 2011.04006,
Table 2: training steps per second and peak memory (GB) on byte-level text, 4x4 TPU v3,
batch 32, at lengths 1K, 2K, 3K, 4K. Each entry is keyed by the registered variant that
implements the model and holds (LRA's model name, steps/s per length, GB per length).
"""

from __future__ import annotations

__all__ = ["PUBLISHED_TABLE2", "PUBLISHED_LENGTHS", "PUBLISHED_BASELINE", "published_baseline"]

PUBLISHED_TABLE2: dict[str, tuple[str, tuple[float, ...], tuple[float, ...]]] = {
    "full": ("Transformer", (8.1, 4.9, 2.3, 1.4), (0.85, 2.65, 5.51, 9.48)),
    "local": ("Local", (9.2, 8.4, 7.4, 7.4), (0.42, 0.76, 1.06, 1.37)),
    "linformer": ("Linformer", (9.3, 9.1, 8.5, 7.7), (0.37, 0.55, 0.99, 0.99)),
    "reformer": ("Reformer", (4.4, 2.2, 1.5, 1.1), (0.48, 0.99, 1.53, 2.28)),
    "sinkhorn": ("Sinkhorn", (9.1, 7.9, 6.6, 5.3), (0.47, 0.83, 1.13, 1.48)),
    "synthesizer": ("Synthesizer", (8.7, 5.7, 6.6, 1.9), (0.65, 1.98, 4.09, 6.99)),
    "bigbird": ("BigBird", (7.4, 3.9, 2.7, 1.5), (0.77, 1.49, 2.18, 2.88)),
    "linear": ("Linear Trans.", (9.1, 9.3, 8.6, 7.8), (0.37, 0.57, 0.80, 1.03)),
    "performer": ("Performer", (9.5, 9.4, 8.7, 8.0), (0.37, 0.59, 0.82, 1.06)),
}
PUBLISHED_LENGTHS = (1024, 2048, 3072, 4096)
PUBLISHED_BASELINE = "Transformer"  # LRA's ratios are against its vanilla Transformer


def published_baseline() -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """LRA's Transformer row, the denominator of the published ratios."""
    return next(entry for entry in PUBLISHED_TABLE2.values() if entry[0] == PUBLISHED_BASELINE)
