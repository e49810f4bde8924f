"""Assemble a run from its config: task rows -> backbone -> method -> tokenized data.

`ptlab.build(config)` is the one way to get a ready pipeline; training, the tests, the
benchmark and any tool that evaluates or predicts with a prompt all call it, so they see the same
data, the same model and the same prompt as `ptlab-train` would.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Union

from omegaconf import DictConfig

from ptlab.backbones import Backbone, build_backbone
from ptlab.compile import compile_blocks
from ptlab.config import Config, to_object
from ptlab.data import TaskData, load_raw_splits, split_rows, tokenize_splits
from ptlab.distributed import World
from ptlab.methods import build_method
from ptlab.methods.base import PromptMethod

log = logging.getLogger("ptlab")


@dataclass
class Pipeline:
    """Everything a run trains and evaluates with, built once."""

    config: Config
    backbone: Backbone
    method: PromptMethod
    data: TaskData
    world: World = field(default_factory=World)

    def prompt_config(self) -> Dict[str, Any]:
        """What a saved prompt needs beside its tensors to be reloaded (checkpoints/best)."""
        return {
            "method": dataclasses.asdict(self.config.method),
            "backbone": self.config.backbone.name,
            "task": self.config.task.name,
            "family": self.config.backbone.family,
            "hidden_size": self.backbone.hidden_size,
            "num_prompt_tokens": self.method.num_tokens,
            "verbalizers": list(self.config.task.verbalizers),
        }


def build(
    config: Union[Config, DictConfig], world: Optional[World] = None, splits: Optional[Sequence[str]] = None
) -> Pipeline:
    """The pipeline `ptlab-train` runs for `config`. `splits` limits which splits are loaded and
    tokenized (None: all of the task's; empty: none, for a model without data). The task's rows
    are read before the model loads, so a data error surfaces first."""
    if isinstance(config, DictConfig):
        config = to_object(config)
    rows = {}
    if splits is None or splits:
        rows = split_rows(load_raw_splits(config.task, config.data), config.task, config.data, config.seed)
        rows = {name: part for name, part in rows.items() if splits is None or name in splits}
    backbone = build_backbone(
        config.backbone, list(config.task.verbalizers), config.data.max_source_length, config.seed
    )
    method = build_method(config.method, backbone.prompt_context(config.seed))
    backbone.check_fits(method.num_tokens)
    if method.backbone_dropout is not None and method.backbone_dropout != config.backbone.dropout:
        wanted = str(method.backbone_dropout).lower()
        log.warning(
            "method=%s is designed for backbone.dropout=%s; this run has backbone.dropout=%s "
            "(set backbone.dropout=%s to follow the method's paper)",
            config.method.run_label, wanted, str(config.backbone.dropout).lower(), wanted,
        )  # fmt: skip
    if config.trainer.compile:
        log.info("trainer.compile: compiled %d transformer blocks", compile_blocks(backbone.model))
    data = tokenize_splits(rows, config.task, backbone.tokenize_sources, config.data.max_source_length)
    return Pipeline(config, backbone, method, data, world or World())
