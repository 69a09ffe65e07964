"""Name -> class registries for plug-ins (solvers, unlearning objectives, ...). Adding one is one decorator."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import SafepruneError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            setattr(entry, "registry_name", name)
            return entry

        return decorate

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise SafepruneError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
