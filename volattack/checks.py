"""Argument checks shared by every layer (no torch import): each raises ``ValueError`` naming
the parameter and the bad value, MONAI-style eager validation."""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Optional

from volattack.registry import suggest


def is_int(value: Any) -> bool:
    """True for ``int`` values that are not ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for ``int``/``float`` values that are not ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """True for finite ints/floats (not bools)."""
    return is_number(value) and math.isfinite(value)


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number in the given range.

    Args:
        name: the parameter's name, used in the message.
        value: the value to check.
        low, high: bounds (inclusive unless ``low_open``/``high_open``).
        integer: require an ``int``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        integer and not isinstance(value, int)
    ):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}.")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}.")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Raise ``ValueError`` naming ``name`` (with a suggestion) unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{name} must be one of {', '.join(choices)}, got {value!r}.{suggest(str(value), choices)}"
        )
    return value


def check_bool(name: str, value: Any) -> bool:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


def check_block_size(block_size: Any) -> Optional[int]:
    """``None`` or a positive integer block side, else ``ValueError`` naming ``block_size``."""
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be None or a positive integer, got {block_size!r}.")
    return block_size


_FRACTION = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def parse_number(value: Any, name: str = "value") -> Any:
    """Accept numbers and fraction strings such as ``"8/255"`` (parsed, never evaluated).

    Other values are returned unchanged; a malformed fraction raises ``ValueError`` naming ``name``.
    """
    if isinstance(value, str) and "/" in value:
        m = _FRACTION.match(value)
        if not m or float(m.group(2)) == 0:
            raise ValueError(f"{name} must be a number or a fraction like '8/255', got {value!r}.")
        return float(m.group(1)) / float(m.group(2))
    return value
