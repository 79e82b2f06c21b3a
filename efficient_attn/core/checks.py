"""Config checks shared by every variant, model and experiment: ``check_config``,
``check_positive_int`` (numpy integers accepted, bools refused: ``_is_int``).

Each raises ``ValueError("<who>: bad hyperparameter: <message>")``, so that a wrong setting is
named with its fix at construction, before anything is compiled.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check_config(variant: str, condition: bool, message: str) -> None:
    """Raise ``ValueError("<variant>: <message>")`` when ``condition`` is false (config checks)."""
    if not condition:
        raise ValueError(f"{variant}: bad hyperparameter: {message}")


def _is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_positive_int(variant: str, field: str, value: Any, minimum: int = 1) -> None:
    """Config check for an integer hyperparameter ``>= minimum`` (numpy integers accepted)."""
    ok = _is_int(value) and value >= minimum
    check_config(variant, ok, f"{field} must be an int >= {minimum}, got {value!r}")
