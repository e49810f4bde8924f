"""Entries by name that the modules of one package register as they are imported: the methods
(ptlab/methods/) and the backbone families (ptlab/model/families/). A new one is a module dropped
into its package; there is no list to extend."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, Generic, Set, TypeVar

from ptlab.errors import ConfigError

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """The entries of package `package`, named by the config key `key` (`method.name`)."""

    def __init__(self, package: str, key: str) -> None:
        self.package, self.key = package, key
        self.entries: Dict[str, Entry] = {}
        self.imported: Set[str] = set()

    def add(self, name: str, entry: Entry) -> None:
        self.entries[name] = entry

    def all(self) -> Dict[str, Entry]:
        """Every entry of the package: each of its modules is imported once, and registers its
        entries as it is imported."""
        for module in pkgutil.iter_modules(importlib.import_module(self.package).__path__):
            if module.name not in self.imported:
                importlib.import_module(f"{self.package}.{module.name}")
                self.imported.add(module.name)
        return self.entries

    def __getitem__(self, name: str) -> Entry:
        """The entry `name`, or one line naming the known ones."""
        entries = self.all()
        if name not in entries:
            raise ConfigError(f"{self.key}={name!r} is not registered; known: {sorted(entries)}")
        return entries[name]
