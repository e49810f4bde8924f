"""Registry of prompt methods: name -> (config schema, module class).

A new method is one module in this package that decorates its class with :func:`register`, plus
one YAML in conf/method/. Every module of the package is found and imported on first use; there
is no list to extend. The trainer never branches on the method's name.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict, Tuple, Type

from ptlab.errors import ConfigError
from ptlab.methods.base import MethodConfig, PromptContext, PromptMethod

METHODS: Dict[str, Tuple[type, Type[PromptMethod]]] = {}
_imported: set = set()


def register(name: str, config_cls: type) -> Callable[[Type[PromptMethod]], Type[PromptMethod]]:
    def wrap(method_cls: Type[PromptMethod]) -> Type[PromptMethod]:
        METHODS[name] = (config_cls, method_cls)
        return method_cls

    return wrap


def registered_methods() -> Dict[str, Tuple[type, Type[PromptMethod]]]:
    """Every method of this package: each module in its folder is imported once, and registers
    its methods as it is imported."""
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _imported:
            importlib.import_module(f"{__name__}.{module.name}")
            _imported.add(module.name)
    return METHODS


def build_method(cfg: MethodConfig, context: PromptContext) -> PromptMethod:
    """Instantiate the method named by ``cfg.name`` for the given backbone facts."""
    methods = registered_methods()
    if cfg.name not in methods:
        raise ConfigError(f"method.name={cfg.name!r} is not registered; known: {sorted(methods)}")
    return methods[cfg.name][1](cfg, context)


__all__ = [
    "METHODS",
    "MethodConfig",
    "PromptContext",
    "PromptMethod",
    "build_method",
    "register",
    "registered_methods",
]
