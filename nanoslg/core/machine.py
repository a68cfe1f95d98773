"""The machine this process runs on: its compute device, a free port, memory to hand back, and the
folder NanoSLG caches built files in (the demo checkpoint, bundled shapes)."""

from __future__ import annotations

import gc
import os
import socket

import torch

from nanoslg.core.errors import ConfigError


def resolve_device(want: str = "auto", local_rank: int = 0) -> torch.device:
    """model.device resolved: auto is this rank's CUDA device where CUDA is available, else the CPU."""
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device=cuda but CUDA is not available; allowed here: auto, cpu")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_device_memory() -> None:
    """Collects garbage and returns the CUDA allocator's cached blocks (for whatever runs next)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cache_root() -> str:
    """~/.cache/nanoslg, or $NANOSLG_CACHE."""
    return os.environ.get("NANOSLG_CACHE") or os.path.expanduser("~/.cache/nanoslg")
