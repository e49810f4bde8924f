"""ptlab's one error type for bad input, and the checks that raise it. A leaf module: every other
module may import it, it imports nothing of ptlab's."""

from __future__ import annotations

import codecs
import math
from typing import Any, Optional


class ConfigError(ValueError):
    """A config value that composes but cannot be used; the message names the value and the fix."""


class FolderHeld(ConfigError):
    """A run folder another live process trains in (ptlab/training/folder_lock.py): this process
    writes nothing there, so it is no failure of that folder's run."""


class TrainingFault(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says where, why and what to try."""


def check_choice(where: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}={value!r} is not one of {list(allowed)}")


def check_encoding(where: str, value: str) -> None:
    try:
        codecs.lookup(value)
    except LookupError:
        raise ConfigError(
            f"{where}={value!r} is not an encoding Python knows: give one such as utf-8, latin-1 or cp1252"
        ) from None


def check_range(
    where: str,
    value: Optional[float],
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    off: str = "",
) -> None:
    """`value` must be a finite number within [low, high] (open ends where asked). None passes when
    `off` says what null means there (e.g. "null: no clipping"), and fails otherwise."""
    if value is None:
        if off:
            return
        raise ConfigError(f"{where} must be set")
    bad = (
        not math.isfinite(value)
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if bad:
        lower = "-inf" if low is None else f"{low:g}"
        upper = "inf" if high is None else f"{high:g}"
        bounds = f"{'(' if low_open else '['}{lower}, {upper}{')' if high_open else ']'}"
        hint = f" ({off})" if off else ""
        raise ConfigError(f"{where}={value!r} must be a number in {bounds}{hint}")
