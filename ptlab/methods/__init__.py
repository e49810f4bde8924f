"""Registry of prompt methods: name -> `Method` (its config schema and its module class).

A new method is one module in this package that decorates its class with :func:`register`, plus
one YAML in conf/method/. Every module of the package is found and imported on first use; there
is no list to extend. The trainer never branches on the method's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Type

from ptlab.methods.base import MethodConfig, PromptContext, PromptMethod
from ptlab.registry import Registry


@dataclass(frozen=True)
class Method:
    """A registered method: its name (`method.name`), its config schema and its module class."""

    name: str
    config: type
    module: Type[PromptMethod]


METHODS: Registry[Method] = Registry(__name__, "method.name")


def register(name: str, config_cls: type) -> Callable[[Type[PromptMethod]], Type[PromptMethod]]:
    def wrap(method_cls: Type[PromptMethod]) -> Type[PromptMethod]:
        METHODS.add(name, Method(name, config_cls, method_cls))
        return method_cls

    return wrap


def registered_methods() -> Dict[str, Method]:
    """Every method of this package (each of its modules imported once)."""
    return METHODS.all()


def build_method(config: MethodConfig, context: PromptContext) -> PromptMethod:
    """Instantiate the method named by ``config.name`` for the given backbone facts."""
    return METHODS[config.name].module(config, context)


__all__ = [
    "METHODS",
    "Method",
    "MethodConfig",
    "PromptContext",
    "PromptMethod",
    "build_method",
    "register",
    "registered_methods",
]
