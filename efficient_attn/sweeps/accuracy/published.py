"""LRA's published Table 1, printed beside ours (a citation; it decides nothing).

Tay et al. 2020, "Long Range Arena: A Benchmark for Efficient Transformers", arXiv
2011.04006, Table 1 (test accuracy %, single runs): the rows whose model a variant here
implements, for the tasks we share (ListOps, Pathfinder-32). Keyed by our variant name, each
entry is (LRA's model name, {task: accuracy}). "blockwise" is exact softmax attention, i.e.
the Transformer row. A variant without an entry gets "-" in the LRA columns.
"""

from __future__ import annotations

__all__ = ["PUBLISHED_TABLE1", "PUBLISHED_TASKS"]

PUBLISHED_TABLE1: dict[str, tuple[str, dict[str, float]]] = {
    "full": ("Transformer", {"listops": 36.37, "pathfinder": 71.40}),
    "blockwise": ("Transformer", {"listops": 36.37, "pathfinder": 71.40}),
    "local": ("Local", {"listops": 15.82, "pathfinder": 66.63}),
    "sparse_transformer": ("Sparse Trans.", {"listops": 17.07, "pathfinder": 71.71}),
    "longformer": ("Longformer", {"listops": 35.63, "pathfinder": 69.71}),
    "linformer": ("Linformer", {"listops": 35.70, "pathfinder": 76.34}),
    "reformer": ("Reformer", {"listops": 37.27, "pathfinder": 68.50}),
    "sinkhorn": ("Sinkhorn", {"listops": 33.67, "pathfinder": 67.45}),
    "synthesizer": ("Synthesizer", {"listops": 36.99, "pathfinder": 69.45}),
    "bigbird": ("BigBird", {"listops": 36.05, "pathfinder": 74.87}),
    "linear": ("Linear Trans.", {"listops": 16.13, "pathfinder": 75.30}),
    "performer": ("Performer", {"listops": 18.01, "pathfinder": 77.05}),
}
PUBLISHED_TASKS = ("listops", "pathfinder")
