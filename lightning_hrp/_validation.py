"""Argument checks shared by every entry point: one wording, and the argument's name in every message."""

from __future__ import annotations

import math
import numbers
from typing import Any, get_args

from lightning_hrp.errors import HRPConfigurationError


def check_int(name: str, value: Any, minimum: int) -> None:
    """``value`` is an integer (Python's or NumPy's, not a ``bool``) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise HRPConfigurationError(f"{name} must be {expected}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """``value`` is ``True`` or ``False`` (a string such as ``"no"`` is not)."""
    if not isinstance(value, bool):
        raise HRPConfigurationError(f"{name} must be True or False, got {value!r}.")


def check_choice(name: str, value: Any, choices: Any) -> None:
    """``value`` is one of the values of the ``Literal`` type ``choices``."""
    if value not in get_args(choices):
        raise HRPConfigurationError(f"{name} must be one of {list(get_args(choices))}, got {value!r}.")


def is_real_number(value: Any) -> bool:
    """A real number: Python's ``int`` and ``float`` and NumPy's scalars alike (``True`` and ``np.True_`` are not)."""
    # numbers.Real takes every NumPy integer and floating scalar (np.float32 is no subclass of float);
    # NumPy's bool is not registered as a number, Python's bool is an int subclass.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_positive_number(value: Any) -> bool:
    """A finite real number above zero (see :func:`is_real_number`)."""
    return is_real_number(value) and math.isfinite(value) and value > 0
