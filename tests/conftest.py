"""Shared fixtures of the whole suite. The test tree mirrors the package:

    tests/ops/          the engines against their references (efficient_attn/ops/)
    tests/variants/     each family's own math (efficient_attn/variants/)
    tests/sweeps/       the experiments (efficient_attn/sweeps/)
    tests/tasks/        the generated tasks (efficient_attn/tasks/)
    tests/conformance/  every registered variant through the same contract
    tests/test_*.py     the top-level modules (core, registry, nn, train, measure, report)
"""

from __future__ import annotations

import sys
from pathlib import Path

# `from conformance.harness import ...` and `import jaxpr_tools` work from every subfolder.
sys.path.insert(0, str(Path(__file__).resolve().parent))
