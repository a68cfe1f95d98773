"""Composes a config from override strings, exactly as `python run.py <overrides>` would."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from nanoslg.core.config import Config, register_schema, validate
from nanoslg.core.config_errors import as_config_error

REPO_DIR = Path(__file__).resolve().parents[2]  # the checkout: run.py, conf/, experiments/
CONF_DIR = str(REPO_DIR / "conf")


def compose_node(overrides: list[str]) -> DictConfig:
    """Raises ConfigError (naming the key, close matches and the keys there) for any mistake."""
    register_schema()
    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app: reuse its search path
            return compose("config", overrides=overrides)
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose("config", overrides=overrides)
    except Exception as e:
        err = as_config_error(e)
        if err is None:
            raise
        raise err from None


def compose_config(overrides: list[str]) -> tuple[Config, DictConfig]:
    node = compose_node(overrides)
    return validate(node), node


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("nanoslg").setLevel(level)
