"""Hydra's and OmegaConf's composition errors, said as ConfigErrors: the key, close matches, the keys
that exist there, the type a value must have.

`python run.py` and `LLM(...)` go through `as_config_error`, so every config mistake reads alike and
exits with the same code (CONFIG_ERROR_EXIT).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

from hydra.errors import HydraException
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from nanoslg.core.config import Config
from nanoslg.core.errors import ConfigError


def _schema_at(path: list[str]) -> type | None:
    """The config dataclass at a dotted path (None past a free-form dict or a leaf)."""
    cls: type = Config
    hints = typing.get_type_hints(cls)
    for part in path:
        if part not in hints:
            return None
        cls = hints[part]
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
    return cls


def unknown_key(full_key: str) -> ConfigError | None:
    """`scheduler.max_num_seq` -> did you mean scheduler.max_num_seqs; the keys of scheduler."""
    *parent, key = full_key.split(".")
    cls = _schema_at(parent)
    if cls is None:
        return None
    keys = sorted(f.name for f in dataclasses.fields(cls))
    prefix = ".".join(parent) + "." if parent else ""
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(prefix + k for k in close)}?" if close else ""
    where = f"under {'.'.join(parent)}" if parent else "at the top level"
    return ConfigError(f"{full_key} is not a config key{hint} The keys {where}: {', '.join(keys)}")


def as_config_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError a composition error means (None: it is not one)."""
    if isinstance(exc, ConfigError):
        return exc
    cause = exc.__cause__ if isinstance(exc, HydraException) and exc.__cause__ is not None else exc
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        if isinstance(cause, (ConfigKeyError, AttributeError)):
            err = unknown_key(cause.full_key)
            if err is not None:
                return err
        if isinstance(cause, ValidationError):
            return ConfigError(f"{cause.full_key}: {str(cause.msg).splitlines()[0]}")
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return ConfigError(str(exc).split("\nConfig search path")[0].strip())
    return None
