"""Assemble a run from its config: task rows -> backbone -> method -> tokenized data.

`ptlab.build(config)` is the one way to get a ready pipeline; training, the tests, the
benchmark and any tool that evaluates or predicts with a prompt all call it, so they see the same
data, the same model and the same prompt as `ptlab-train` would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Dict, Optional, Sequence, Union

import torch
from datasets import DatasetDict
from omegaconf import DictConfig

from ptlab.config.schema import Config, DataConfig, TaskConfig, to_object
from ptlab.data.examples import TaskData, load_raw_splits, split_rows, tokenize_splits
from ptlab.data.token_cache import tokenizer_identity
from ptlab.errors import ConfigError
from ptlab.methods import build_method
from ptlab.methods.base import MethodConfig, PromptMethod
from ptlab.model.backbone import Backbone
from ptlab.model.compile import compile_blocks
from ptlab.model.families import FAMILIES, build_backbone
from ptlab.model.fingerprint import fingerprint
from ptlab.model.prompt_fit import check_fits
from ptlab.model.readout import TaskReadout
from ptlab.provenance import code_version
from ptlab.training.checkpoint import config_record, saved_prompt
from ptlab.training.devices import run_autocast, run_device
from ptlab.training.distributed import World
from ptlab.training.evaluate import split_metrics
from ptlab.training.randomness import RunRandomness

log = logging.getLogger("ptlab")


@dataclass
class Pipeline:
    """Everything a run trains and evaluates with, built once: the frozen backbone (which could
    serve other runs too), this run's task readout and its prompt method."""

    config: Config
    backbone: Backbone
    readout: TaskReadout
    method: PromptMethod
    data: TaskData
    randomness: RunRandomness  # the run's own random streams (its method holds the generator)
    world: World = field(default_factory=World)
    fingerprint: str = ""  # the frozen weights' and tokenizer's (ptlab/model/fingerprint.py)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where place() put it

    def place(self) -> torch.device:
        """Move the backbone, the readout and the method to the run's device (this rank's GPU on CUDA)."""
        device = run_device(self.config.hardware, self.world)
        self.backbone.to(device)
        self.readout.to(device)
        self.method.to(device)
        self.device = device
        return device

    def autocast(self) -> ContextManager:
        """bf16 autocast on CUDA when `hardware.precision=bf16` (the prompt itself stays fp32)."""
        return run_autocast(self.config.hardware)

    def evaluate(self, split: str, batch_size: Optional[int] = None) -> Dict[str, float]:
        """The task's metrics on a split, as the trainer computes them (rank or generate mode)."""
        trainer = self.config.trainer
        return split_metrics(self.backbone, self.readout, self.method, self.data[split], self.config.task,
                             self.world, batch_size or trainer.eval_batch, self.device,
                             self.autocast, trainer.eval_mode, trainer.max_new_tokens)  # fmt: skip

    def prompt_config(self) -> Dict[str, Any]:
        """What a saved prompt needs beside its tensors to be reloaded and scored, from its folder
        alone (checkpoints/best, copied anywhere): the run's whole config among it."""
        return {
            **config_record(self.config),
            "hidden_size": self.backbone.hidden_size,
            "num_prompt_tokens": self.method.num_tokens,
            "data": self.data.digest(),
            "fingerprint": self.fingerprint,
            "config": dataclasses.asdict(self.config),
            "code": code_version(),
        }


def read_init_prompt(config: MethodConfig) -> Dict[str, torch.Tensor]:
    """The trained method tensors of `method.init_from` (read before any model loads)."""
    try:
        tensors, record = saved_prompt(Path(config.init_from))
    except ConfigError as error:
        raise ConfigError(f"method.init_from={config.init_from!r}: {error}") from None
    if record["method"]["name"] != config.name:
        raise ConfigError(
            f"method.init_from={config.init_from!r} holds a {record['method']['name']} prompt; this run's "
            f"method is {config.name}"
        )
    return {key[len("method.") :]: value for key, value in tensors.items() if key.startswith("method.")}


def start_from(method: PromptMethod, config: MethodConfig, loaded: Dict[str, torch.Tensor]) -> None:
    """Prompt transfer (SPoT, Vu et al. 2022): the method starts from another run's trained tensors."""
    for key, value in method.state_dict().items():
        if key not in loaded or loaded[key].shape != value.shape:
            found = tuple(loaded[key].shape) if key in loaded else "nothing"
            raise ConfigError(
                f"method.init_from={config.init_from!r}: its {key} has shape {found}, this run's has "
                f"{tuple(value.shape)}: give the same prompt length, hidden size and method options"
            )
    method.load_state_dict(loaded)
    log.info("method.init_from: starting from the trained prompt of %s", config.init_from)


@dataclass
class SharedBackbone:
    """A frozen backbone as loaded for a config (compiled if asked) and its fingerprint: what the
    runs that share it need of it; and the task files they read, read once (`raw_splits`)."""

    backbone: Backbone
    fingerprint: str
    read: Dict[str, DatasetDict] = field(default_factory=dict)

    def raw_splits(self, task: TaskConfig, data: DataConfig) -> DatasetDict:
        """The task's raw splits, loaded by the first run that asks; the others reuse them (each run
        still subsamples and splits them with its own seed)."""
        key = json.dumps([dataclasses.asdict(task), dataclasses.asdict(data)], sort_keys=True, default=str)
        if key not in self.read:
            self.read[key] = load_raw_splits(task, data)
        return self.read[key]


def shared_settings(config: Config) -> Dict[str, Any]:
    """What the members of a pack must have in common."""
    return {
        "backbone": dataclasses.asdict(config.backbone),
        "hardware": dataclasses.asdict(config.hardware),
        "trainer.compile": config.trainer.compile,
    }


def frozen_backbone(config: Config) -> SharedBackbone:
    """The frozen backbone `config` asks for, ready for any number of runs."""
    backbone = build_backbone(config.backbone)
    if config.trainer.compile:
        log.info("trainer.compile: compiled %d transformer blocks", compile_blocks(backbone.model))
    return SharedBackbone(backbone, fingerprint(backbone.model, backbone.tokenizer))


def build(
    config: Union[Config, DictConfig],
    world: Optional[World] = None,
    splits: Optional[Sequence[str]] = None,
    shared: Optional[SharedBackbone] = None,
) -> Pipeline:
    """The pipeline `ptlab-train` runs for `config`. `splits` limits which splits are loaded and
    tokenized (None: all of the task's; empty: none, for a model without data). The task's rows
    are read before the model loads, so a data error surfaces first. `shared` is a backbone already
    built for the same `config.backbone` and shared with other runs (a packed sweep, several run
    folders scored at once): only the run's own parts are built."""
    if isinstance(config, DictConfig):
        config = to_object(config)
    FAMILIES[config.backbone.family]  # an unknown family is one line, before the data and the model
    initial = read_init_prompt(config.method) if config.method.init_from else None
    rows = {}
    if splits is None or splits:
        raw = shared.raw_splits(config.task, config.data) if shared else load_raw_splits(config.task, config.data)
        rows = split_rows(raw, config.task, config.data, config.seed)
        rows = {name: part for name, part in rows.items() if splits is None or name in splits}
    shared = shared or frozen_backbone(config)
    backbone = shared.backbone
    readout = backbone.readout(list(config.task.verbalizers), config.data.max_source_length, config.seed)
    randomness = RunRandomness(config.seed)
    context = dataclasses.replace(backbone.prompt_context(readout, config.seed), generator=randomness.generator)
    method = build_method(config.method, context)
    if initial is not None:
        start_from(method, config.method, initial)
    check_fits(backbone, readout, method)
    if method.backbone_dropout is not None and method.backbone_dropout != config.backbone.dropout:
        wanted = str(method.backbone_dropout).lower()
        log.warning(
            "method=%s is designed for backbone.dropout=%s; this run has backbone.dropout=%s "
            "(set backbone.dropout=%s to follow the method's paper)",
            config.method.run_label, wanted, str(config.backbone.dropout).lower(), wanted,
        )  # fmt: skip
    identity = tokenizer_identity(backbone.tokenizer) if config.data.cache_tokenized and rows else None
    tokenize = functools.partial(backbone.tokenize_sources, readout)
    data = tokenize_splits(rows, config.task, tokenize, config.data.max_source_length, identity)
    return Pipeline(config, backbone, readout, method, data, randomness, world or World(),
                    shared.fingerprint)  # fmt: skip
