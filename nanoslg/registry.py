"""One small registry per extension point: a config name maps to a class."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from nanoslg.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str):
        self.kind = kind  # what is registered, for messages ("cache backend")
        self.key = key  # the config key that names it ("cache.backend")
        self._items: dict[str, T] = {}

    def register(self, *names: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for name in names:
                if name in self._items:
                    raise ValueError(f"{self.kind} {name!r} registered twice")
                self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            allowed = ", ".join(sorted(self._items)) or "(none)"
            raise ConfigError(f"{self.key}={name!r} is not a known {self.kind}; allowed: {allowed}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


CACHE_BACKENDS: Registry = Registry("cache backend", "cache.backend")
SCHEDULERS: Registry = Registry("scheduler policy", "scheduler.policy")
PARALLEL: Registry = Registry("parallel strategy", "parallel.mode")
ARCHITECTURES: Registry = Registry("model architecture", "config.json architectures")
BENCHMARKS: Registry = Registry("bench workload", "bench.workload")
