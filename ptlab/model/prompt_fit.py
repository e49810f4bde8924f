"""Whether a prompt and a task's longest input fit a backbone's positions, checked when a run is
built, so that a too-long prompt is one line, not an index error inside the position embeddings."""

from __future__ import annotations

from ptlab.errors import ConfigError
from ptlab.methods.base import PromptMethod
from ptlab.model.backbone import Backbone
from ptlab.model.readout import TaskReadout


def positions_taken(backbone: Backbone, method: PromptMethod) -> int:
    """Positions the prompt occupies in front of the input: its block, and a prefix in the
    input's stack where the family counts its positions (`prefix_takes_positions`)."""
    prefix = backbone.prefix_takes_positions and backbone.input_stack in method.prefix_stacks
    return method.num_tokens + (method.prefix_length if prefix else 0)


def check_fits(backbone: Backbone, readout: TaskReadout, method: PromptMethod) -> None:
    """Fail early when prompt + input (+ the targets, where the family feeds them) cannot fit."""
    num_prompt_tokens = positions_taken(backbone, method)
    limit = backbone.position_limit()
    longest_target = max(len(ids) for ids in readout.choice_ids) if backbone.targets_take_positions else 0
    needed = readout.max_source_length + num_prompt_tokens + longest_target
    if limit is not None and needed > limit:
        targets = f" + {longest_target} target tokens" if longest_target else ""
        raise ConfigError(
            f"data.max_source_length={readout.max_source_length} + {num_prompt_tokens} prompt tokens"
            f"{targets} = {needed} exceeds the backbone's {limit} positions: lower method.prompt_length "
            "or data.max_source_length"
        )
