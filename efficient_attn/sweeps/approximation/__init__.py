"""The approximation experiment: how far each variant is from the exact reference ("full") as
its budget grows.

For every registered variant (plugins included) and every value of its budget hyperparameter
(its registration's ``budget``: Performer's features, Linformer's rank, Nystromformer's
landmarks, local / Longformer windows, BigBird's blocks, Reformer's hashes, ...; a variant
without one gets one row at its defaults), on the same inputs as the reference, we measure

    relative output error   ||out - out_full|| / ||out_full||     (real queries only)
    row KL                  mean over rows of KL(A_full || A_variant), in nats

where A is the attention matrix a variant *implies*, found generically by probing it with
one-hot values (``efficient_attn.patterns.implied_weights``: out = A V for every variant
linear in V; ``probe_consistency`` checks it). KL is reported only where A is a
distribution (nonnegative rows summing to 1); Linformer and Nystromformer imply signed
weights, for which the mean negative mass per row is reported instead. The KL smooths A
with weight 1e-6 of the uniform distribution: a key that full attends to and a sparse
variant never sees costs about log(1e6) = 13.8 nats per unit of full's weight on it.

Inputs: (a) Gaussian q, k, v, with q scaled so that the logits' standard deviation is
``q_scale`` (0.25: flat attention; 1: moderate; 4: peaked), mean ± std over seeds (each seed
draws new inputs and a new module initialisation); (b) the q, k, v that a small trained
exact-reference Classifier computes at one layer on ListOps examples (its padding passed as
kv_mask), mean ± std over module seeds. Variants with learned parameters
(``registry.has_parameters``: linformer's projections, synthesizer, sinkhorn) are untrained
in both: their rows measure an initialisation, not what training would reach.

A picture, ``patterns.png``: each variant's implied weights for one structured input at a
small N (``patterns.structured_qk``, at the registration's ``pattern_setting``),
bidirectional and causal, beside the reference's.

Outputs under ``--out`` (default ``results/approximation/<preset>``): ``rows.jsonl`` (the
resumable store: a rerun skips finished rows; ``--force`` recomputes; ``--report-only``
rebuilds the outputs from it without measuring), ``table.md``, ``rows.csv``, ``rows.json``
(with the environment), ``error_vs_budget.png``, ``patterns.png`` (+ ``patterns.npz``, its
cached matrices). The trained model's q, k, v are cached in ``trained_qkv.npz`` beside the
rows, so a rerun that adds a variant does not train again.

Presets (``presets.py``): quick (N = 128, 3 scales x 3 seeds, 3 budget values per variant,
bidirectional errors), cpu (N = 1024, every budget value, causal too), lra (N = 2048 with
ListOps at LRA's length and model size; an accelerator).

The package, one concept a module:

    config.py    ApproxConfig, TrainedInput          presets.py   quick(), cpu(), lra()
    plan.py      budgets from the registry, units    inputs.py    Gaussian, trained, shared-QK keys
    compare.py   one unit against the reference      pictures.py  the pattern panels
    run.py       the sweep into the RowStore         report.py    table.md, rows.csv, rows.json
    plots.py     error_vs_budget.png                 cli.py       ``main(argv)``
"""

from efficient_attn.patterns import PROBE_ENTRIES as PROBE_SCORES
from efficient_attn.sweeps.approximation.cli import main
from efficient_attn.sweeps.approximation.config import SCALE_NAMES, ApproxConfig, TrainedInput
from efficient_attn.sweeps.approximation.plan import budget_of, plan_units
from efficient_attn.sweeps.approximation.presets import PRESETS
from efficient_attn.sweeps.approximation.report import markdown, write_outputs
from efficient_attn.sweeps.approximation.run import run

__all__ = [
    "BUDGETS", "LENGTH_LIKE", "PATTERN_SETTINGS", "LEARNED", "SCALE_NAMES", "PROBE_SCORES",
    "TrainedInput", "ApproxConfig", "PRESETS", "budget_of", "plan_units", "run", "markdown", "write_outputs", "main",
]

# The former tables keyed by variant name, now read-only views of the registrations, read
# when asked for (so plugins loaded later count).
_VIEWS = {
    "BUDGETS": "budgets",
    "LENGTH_LIKE": "length_like_knobs",
    "PATTERN_SETTINGS": "pattern_settings",
    "LEARNED": "learned",
}


def __getattr__(name: str):
    if name in _VIEWS:
        from efficient_attn.sweeps.approximation import plan

        return getattr(plan, _VIEWS[name])()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
