"""Each default lives in one place: a schema field either has no default (MISSING: every YAML of
its group sets it) or its default is the schema's alone (no YAML repeats it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import MISSING

from ptlab.config.schema import (
    BackboneConfig,
    Config,
    DataConfig,
    HardwareConfig,
    LoggerConfig,
    StagesConfig,
    TaskConfig,
    TrainerConfig,
    to_object,
)
from ptlab.methods import registered_methods

from conftest import REPO, compose_config

GROUP_SCHEMAS = {
    "backbone": BackboneConfig,
    "task": TaskConfig,
    "hardware": HardwareConfig,
    "logger": LoggerConfig,
    "stages": StagesConfig,
}


def plain(value):
    if dataclasses.is_dataclass(value):
        return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def schema_default(schema: type, key: str):
    fields = {f.name: f for f in dataclasses.fields(schema)}
    assert key in fields, f"{schema.__name__} has no field {key!r}"
    field = fields[key]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def repeated_defaults(values: dict, schema: type, where: str) -> list:
    """The keys of `values` whose value equals the schema's own default."""
    found = []
    for key, value in values.items():
        if key == "defaults":
            continue
        default = schema_default(schema, key)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            found += repeated_defaults(value, type(default), f"{where}.{key}")
        elif default is not MISSING and value == plain(default):
            found.append(f"{where}.{key}")
    return found


def group_yamls():
    for group in [*GROUP_SCHEMAS, "method"]:
        for path in sorted((REPO / "conf" / group).glob("*.yaml")):
            yield pytest.param(group, path, id=f"{group}/{path.stem}")


def method_schema(values: dict) -> type:
    (schema_name,) = [entry for entry in values["defaults"] if str(entry).startswith("/schema_method_")]
    return registered_methods()[schema_name.removeprefix("/schema_method_").removesuffix("@_here_")].config


@pytest.mark.parametrize("group, path", group_yamls())
def test_no_group_yaml_repeats_a_schema_default(group, path: Path):
    values = yaml.safe_load(path.read_text())
    assert "# @package _global_" not in path.read_text(), f"{path.name} sets values of other groups"
    schema = method_schema(values) if group == "method" else GROUP_SCHEMAS[group]
    assert repeated_defaults(values, schema, group) == []


def test_the_root_config_repeats_no_trainer_or_data_default():
    values = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())
    assert repeated_defaults({k: v for k, v in values.items() if k != "hydra"}, Config, "") == []


def test_the_default_config_is_the_schemas_defaults():
    config = to_object(compose_config([]))
    assert config.trainer == TrainerConfig()
    assert dataclasses.replace(config.data, dir=None) == dataclasses.replace(DataConfig(), dir=None)
    assert (config.backbone.name, config.task.name, config.method.name) == (
        "minilm_l6",
        "sst2",
        "prompt_tuning",
    )
    assert (config.hardware.name, config.logger.name, config.stages.name) == ("cpu", "wandb", "constant")
