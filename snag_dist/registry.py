"""Name -> component registries, so configs name components by string."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from snag_dist.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named family of components (encoders, fusions, tasks, backends)."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.family} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            raise ConfigError(f"unknown {self.family} '{name}' (known: {known})")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
