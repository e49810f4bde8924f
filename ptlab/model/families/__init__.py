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
# what the base class cannot do for a family (docs/architecture.md, "A family")
REQUIRED = ("auto_class", "runs_logits", "runs_scores", "forward_flops")


def register(name: str) -> Callable[[Type[Backbone]], Type[Backbone]]:
    """Register a `Backbone` subclass as the family `name` (its `family` attribute); one that lacks
    what every family must have is refused at import, naming it."""

    def wrap(backbone_cls: Type[Backbone]) -> Type[Backbone]:
        base = backbone_cls.__mro__.index(Backbone)  # what the family's own classes define
        own = [vars(klass) for klass in backbone_cls.__mro__[:base]]
        missing = [attribute for attribute in REQUIRED if not any(attribute in names for names in own)]
        if missing:
            raise TypeError(f"family {name!r} ({backbone_cls.__name__}) must define {', '.join(missing)} "
                            "(docs/architecture.md, 'A family')")  # fmt: skip
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
