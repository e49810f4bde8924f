"""Registry of backbone families: name -> `Family` (its `Backbone` class), found by the backbone
config's `family`, as methods are found by `method.name` (ptlab/methods/__init__.py).

A new family is one module in this package that decorates its `Backbone` subclass with
:func:`register`, plus one YAML in conf/backbone/. Every module of the package is found and
imported on first use; there is no list to extend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Type

from ptlab.config.schema import BackboneConfig
from ptlab.errors import ConfigError
from ptlab.model.backbone import Backbone
from ptlab.model.loading import load_model_and_tokenizer
from ptlab.registry import Registry


@dataclass(frozen=True)
class Family:
    """A registered family: its name (the backbone config's `family`) and its `Backbone` class."""

    name: str
    backbone: Type[Backbone]


FAMILIES: Registry[Family] = Registry(__name__, "backbone.family")


def register(name: str) -> Callable[[Type[Backbone]], Type[Backbone]]:
    """Register a `Backbone` subclass as the family `name` (its `family` attribute)."""

    def wrap(backbone_cls: Type[Backbone]) -> Type[Backbone]:
        backbone_cls.family = name
        FAMILIES.add(name, Family(name, backbone_cls))
        return backbone_cls

    return wrap


def registered_families() -> Dict[str, Family]:
    """Every family of this package (each of its modules imported once)."""
    return FAMILIES.all()


def build_backbone(config: BackboneConfig) -> Backbone:
    """Load, freeze and wrap the configured backbone (task facts live in each run's readout)."""
    family = FAMILIES[config.family]
    model, tokenizer = load_model_and_tokenizer(config, family.backbone.auto_class)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ConfigError(f"backbone {config.name!r}: its tokenizer has neither a pad nor an eos token")
    return family.backbone(config, model, tokenizer)


__all__ = ["FAMILIES", "Family", "build_backbone", "register", "registered_families"]
