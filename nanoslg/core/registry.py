"""One registration mechanism for every extension point: a config name -> the class that implements it.

A plugin registers itself where it is written (`@SCHEDULERS.register("lpm")` above its class). The
registry learns those names by reading the modules of its package as syntax trees, not by importing
them, so the config schema checks a name at compose time without importing torch or any plugin;
`get` then imports only the module that registered the name. Adding a plugin is one file in the
package plus one YAML under conf/: nothing else lists it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from nanoslg.core.errors import ConfigError

T = TypeVar("T")


def declared_names(package: str, symbol: str) -> dict[str, str]:
    """name -> module for every `<symbol>.register("name", ...)` call written in the package's modules."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package} is not a package")
    found: dict[str, str] = {}
    for folder in spec.submodule_search_locations:
        for file in sorted(Path(folder).glob("*.py")):
            module = package if file.stem == "__init__" else f"{package}.{file.stem}"
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
                func = getattr(node, "func", None)
                if (
                    isinstance(node, ast.Call)
                    and isinstance(func, ast.Attribute)
                    and func.attr == "register"
                    and isinstance(func.value, ast.Name)
                    and func.value.id == symbol
                ):
                    for arg in node.args:
                        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                            found[arg.value] = module
    return found


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str, package: str, symbol: str):
        self.kind = kind  # what is registered, for messages ("cache backend")
        self.key = key  # the config key that names it ("cache.backend")
        self.package = package  # where its plugins live ("nanoslg.cache")
        self.symbol = symbol  # this registry's name in nanoslg.core.registry, as plugins write it
        self._items: dict[str, T] = {}  # filled as plugin modules are imported
        self._where: dict[str, str] | None = None  # name -> module, read from the sources

    def register(self, *names: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for name in names:
                if name in self._items:
                    raise ValueError(f"{self.kind} {name!r} registered twice")
                self._items[name] = obj
            return obj

        return deco

    def _declared(self) -> dict[str, str]:
        if self._where is None:
            self._where = declared_names(self.package, self.symbol)
        return self._where

    def names(self) -> list[str]:
        return sorted(self._declared())

    def __contains__(self, name: str) -> bool:
        return name in self._declared()

    def check(self, name: str) -> None:
        """Raises ConfigError naming the key and the allowed values unless `name` is registered."""
        if name not in self:
            raise ConfigError(f"{self.key}={name!r} is not a known {self.kind}; allowed: {', '.join(self.names())}")

    def get(self, name: str) -> T:
        self.check(name)
        if name not in self._items:
            importlib.import_module(self._declared()[name])
        if name not in self._items:  # the source says it registers, the module did not: a packaging bug
            raise RuntimeError(f"{self._declared()[name]} declares {self.kind} {name!r} but did not register it")
        return self._items[name]


CACHE_BACKENDS: Registry = Registry("cache backend", "cache.backend", "nanoslg.cache", "CACHE_BACKENDS")
SCHEDULERS: Registry = Registry("scheduler policy", "scheduler.policy", "nanoslg.scheduler", "SCHEDULERS")
PARALLEL: Registry = Registry("parallel strategy", "parallel.mode", "nanoslg.parallel", "PARALLEL")
ARCHITECTURES: Registry = Registry("model architecture", "config.json architectures", "nanoslg.model", "ARCHITECTURES")
BENCHMARKS: Registry = Registry("bench workload", "bench.workload", "nanoslg.bench", "BENCHMARKS")
QUANTIZATION: Registry = Registry("quantization method", "model.quantization", "nanoslg.model.quant", "QUANTIZATION")
TOOL_PARSERS: Registry = Registry("tool parser", "server.tool_parser", "nanoslg.server.tool_parsers", "TOOL_PARSERS")
