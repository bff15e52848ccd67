"""Plugin discovery: the one place that knows how decoders, backends and outputs are found.

A plugin folder (``decoders/``, ``backends/``, ``outputs/``) holds one module per plugin. Each
declares ``PLUGIN``: a record naming its ``type`` (the key configs use, e.g. ``decoder: {type:
json}``), its config model and its implementation. Modules whose names start with ``_`` and the
folder's ``base`` module (the protocol the plugins implement) are not plugins. Adding a plugin is
adding one module; nothing else lists them, and ``__subclasses__`` tricks are not used: a module
says explicitly what it provides, and a module that says nothing is an error, not a silent skip.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Protocol, TypeVar


class Named(Protocol):
    """What every plugin record has: the ``type`` key configs select it by."""

    @property
    def type(self) -> str:
        """The config key, e.g. ``json``."""
        ...


P = TypeVar("P", bound=Named)


def discover(package: str, kind: type[P]) -> dict[str, P]:
    """Every plugin module in PACKAGE, by type, in module-name order.

    Raises TypeError on a module without a KIND ``PLUGIN`` or on two plugins claiming one type.
    """
    found: dict[str, P] = {}
    owner: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__),
                       key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        plugin = getattr(module, "PLUGIN", None)
        if not isinstance(plugin, kind):
            raise TypeError(f"{module.__name__} is in a plugin folder but declares no "
                            f"PLUGIN = {kind.__name__}(...)")
        if plugin.type in found:
            raise TypeError(f"plugins {owner[plugin.type]} and {module.__name__} both claim "
                            f"type {plugin.type!r}")
        found[plugin.type] = plugin
        owner[plugin.type] = module.__name__
    return found
