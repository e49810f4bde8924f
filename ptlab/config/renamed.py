"""Config names that changed. A run saved under an old name reads, resumes and compares as today's
config, and an old name on the command line is one line that points to the new one: a user's
command never breaks silently, nor trains with a setting ignored."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Sequence

from ptlab.errors import ConfigError


@dataclass(frozen=True)
class Renamed:
    """A top-level node (and its conf/ group) under a new name, and why it moved."""

    name: str
    why: str


RENAMED_NODES: Dict[str, Renamed] = {
    "schedule": Renamed("stages", "FPT's stages of partial models; the lr schedule is trainer.lr_schedule"),
}


def todays_key(key: str) -> str:
    """A dotted key (`schedule.score_examples`) or a group (`schedule`) under today's name."""
    head, dot, rest = key.partition(".")
    return (RENAMED_NODES[head].name if head in RENAMED_NODES else head) + dot + rest


def with_todays_names(config: Mapping[str, Any]) -> Dict[str, Any]:
    """A saved config's top-level nodes under today's names, in their order."""
    return {todays_key(key): value for key, value in config.items()}


def check_override_names(overrides: Sequence[str]) -> None:
    """One line for an override that names an old node or group (`schedule=fpt`,
    `schedule.score_examples=8`, `+schedule.x=1`, `~schedule`), with the override to write."""
    for override in overrides:
        sign = override[: len(override) - len(override.lstrip("+~"))]
        key, equals, value = override[len(sign) :].partition("=")
        head = key.partition(".")[0].partition("@")[0]
        if head in RENAMED_NODES:
            renamed = RENAMED_NODES[head]
            new = f"{sign}{renamed.name}{key[len(head) :]}{equals}{value}"
            raise ConfigError(f"{override!r}: the group {head!r} is now {renamed.name!r} ({renamed.why}): "
                              f"write {new!r}")  # fmt: skip


def with_pointer(message: str) -> str:
    """Hydra's one-line error about an old group in a YAML file (`override /schedule: fpt`,
    a `schedule:` node: "Could not override 'schedule'", "Key 'schedule' not in 'Config'") with
    the new name added."""
    for old, renamed in RENAMED_NODES.items():
        said = f"is now {renamed.name!r}" in message  # check_override_names's own line
        if not said and re.search(rf"'/?{re.escape(old)}(/[^']*)?'", message):
            return f"{message} (the group {old!r} is now {renamed.name!r}: {renamed.why})"
    return message
