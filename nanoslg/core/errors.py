"""Errors a user can cause; each names what was wrong."""

# `python run.py` exits with this code on any config mistake (and on a request it cannot serve).
CONFIG_ERROR_EXIT = 2


class ConfigError(ValueError):
    """A config value is not allowed; the message names the key and the allowed values."""


class RequestError(ValueError):
    """A request cannot be served as asked (bad field, prompt too long). `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class EngineDeadError(RuntimeError):
    """The engine loop (or a worker rank) died; requests in flight fail with this."""
