"""Package names imported on first use (PEP 562), so that importing a package stays light: the
server answers /ping before torch is imported, and the S3 read starts before it too."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, module_of: dict[str, str]) -> tuple[Callable, Callable]:
    """The package's `__getattr__` and `__dir__`: each name comes from its module when first
    asked for, then stays in the package."""

    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(module_of)

    return __getattr__, __dir__
