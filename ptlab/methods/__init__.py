"""Registry of prompt methods: name -> (config schema, module class).

A new method is one module here that calls :func:`register` plus one YAML in conf/method/.
The trainer never branches on the method's name.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple, Type

from ptlab.methods.base import PromptContext, PromptMethod

METHODS: Dict[str, Tuple[type, Type[PromptMethod]]] = {}


def register(name: str, config_cls: type) -> Callable[[Type[PromptMethod]], Type[PromptMethod]]:
    def wrap(method_cls: Type[PromptMethod]) -> Type[PromptMethod]:
        METHODS[name] = (config_cls, method_cls)
        return method_cls

    return wrap


def build_method(cfg, context: PromptContext) -> PromptMethod:
    """Instantiate the method named by ``cfg.name`` for the given backbone facts."""
    from ptlab.config import ConfigError

    if cfg.name not in METHODS:
        raise ConfigError(f"method.name={cfg.name!r} is not registered; known: {sorted(METHODS)}")
    return METHODS[cfg.name][1](cfg, context)


# import the method modules so they register themselves
from ptlab.methods import prompt_tuning, residual, smop, superpos  # noqa: E402,F401

__all__ = ["METHODS", "PromptContext", "PromptMethod", "build_method", "register"]
