"""Which checkpoint a config names: a Hugging Face folder (model.path), a bundled shape for random
weights (model.shape), or the demo model built on first use."""

from __future__ import annotations

import os
from dataclasses import dataclass

from nanoslg.core.config import Config
from nanoslg.core.errors import ConfigError
from nanoslg.core.machine import cache_root
from nanoslg.model.demo import ensure_demo_checkpoint
from nanoslg.model.hf_config import ModelArgs, load_args, shape_path


@dataclass
class Checkpoint:
    path: str  # folder with config.json (and weights unless dummy)
    args: ModelArgs
    has_weights: bool
    has_tokenizer: bool


def resolve_checkpoint(cfg: Config) -> Checkpoint:
    m = cfg.model
    if m.path:
        path = os.path.expanduser(m.path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"model.path={m.path!r} is not a checkpoint folder (no config.json there)")
    elif m.shape:
        path = _shape_dir(m.shape)
    elif m.name == "demo":
        path = ensure_demo_checkpoint()
    else:
        raise ConfigError(f"model.path is required for model={m.name!r} (a Hugging Face checkpoint folder)")
    args = load_args(path)
    has_weights = any(f.endswith(".safetensors") for f in os.listdir(path))
    has_tok = any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
    if m.load_format != "dummy" and not has_weights:
        raise ConfigError(
            f"no *.safetensors in {path}; set model.path to a checkpoint with weights, "
            "or model.load_format=dummy for random weights"
        )
    return Checkpoint(path, args, has_weights, has_tok)


def _shape_dir(shape: str) -> str:
    """A bundled shape is one json file; the loader wants a folder with config.json, so make one."""
    src = shape_path(shape)
    cache = os.path.join(cache_root(), "shapes", shape)
    os.makedirs(cache, exist_ok=True)
    dst = os.path.join(cache, "config.json")
    with open(src) as f:
        text = f.read()
    if not os.path.exists(dst) or open(dst).read() != text:
        tmp = f"{dst}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, dst)
    return cache
