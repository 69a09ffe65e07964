"""Name -> class registries for plug-ins (pruning methods, unlearning objectives, solvers, ...).

Adding one is one decorator in one file. A registry made with ``discover="package"`` imports every public
module of that package the first time it is read, so a new file in that package registers itself with no
other edit; ``entry_point_group`` also loads installed third-party plug-ins, and ``load_plugins`` imports
user modules named on the command line (``--plugins my_pkg.my_method``).
"""
from __future__ import annotations

from importlib import import_module
from typing import Callable, Generic, Iterable, TypeVar

from .errors import SafepruneError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, discover: str | None = None, entry_point_group: str | None = None):
        self.kind = kind
        self.discover = discover
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}
        self._discovered = discover is None and entry_point_group is None

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            setattr(entry, "registry_name", name)
            return entry

        return decorate

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True  # before importing: a discovered module may read the registry itself
        if self.discover is not None:
            import pkgutil

            package = import_module(self.discover)
            for info in pkgutil.iter_modules(package.__path__):
                if not info.name.startswith("_"):
                    import_module(f"{self.discover}.{info.name}")
        if self.entry_point_group is not None:
            from importlib.metadata import entry_points

            for entry_point in entry_points(group=self.entry_point_group):
                entry_point.load()

    def get(self, name: str) -> T:
        self._discover()
        if name not in self._entries:
            raise SafepruneError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._entries


def load_plugins(modules: Iterable[str]) -> None:
    """Import user modules whose decorators register plug-ins (``--plugins my_pkg.my_objective``)."""
    for module in modules:
        try:
            import_module(module)
        except ImportError as exc:
            raise SafepruneError(f"--plugins {module}: cannot import it ({exc}); is it on PYTHONPATH?") from exc
