"""Lazy attribute exports for package __init__ files: names resolve (and import their module) on first use, so
importing a package stays light (no diffusers, deepspeed or triton until something needs them)."""
from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, table: dict[str, str], namespace: dict, public: list[str]):
    """Return (__getattr__, __dir__) for ``package`` exporting ``name -> table[name]`` (a module path).

    A resolved value is stored in ``namespace`` (the package's globals) so later lookups skip this hook.
    """

    def __getattr__(name):
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        namespace[name] = value
        return value

    def __dir__():
        return public

    return __getattr__, __dir__
