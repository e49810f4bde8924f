"""ptlab's one error type for bad input, and the checks that raise it. A leaf module: every other
module may import it, it imports nothing of ptlab's."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value that composes but cannot be used; the message names the value and the fix."""


def check_choice(where: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}={value!r} is not one of {list(allowed)}")
