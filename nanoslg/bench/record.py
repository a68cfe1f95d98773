"""One JSON record per bench run (nanoslg/bench/aggregate.py turns a folder of them into a table and a plot).

experiments/<bench.name>/records/<YYYYmmdd-HHMMSS>-<config hash>.json      (a preset)
outputs/bench/<workload>/records/<YYYYmmdd-HHMMSS>-<config hash>.json      (an ad-hoc run)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from nanoslg.core.compose import REPO_DIR


def config_dict(cfg: Any) -> dict:
    """The full composed config as plain containers (DictConfig, structured dataclass or dict)."""

    if isinstance(cfg, dict):
        return cfg
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def hydra_overrides() -> list[str] | None:
    """The command line's overrides when running inside a Hydra app (None otherwise)."""
    try:
        if HydraConfig.initialized():
            return list(HydraConfig.get().overrides.task)
    except Exception:  # not inside a Hydra app: the record simply has no overrides
        pass
    return None


def unswept_params() -> dict[str, str] | None:
    """A preset's sweep (`hydra.sweeper.params`) in a run started without -m: Hydra then runs one job
    with the config's own values and ignores the sweep. None otherwise."""
    try:
        if HydraConfig.initialized():
            hc = HydraConfig.get()
            params = hc.sweeper.get("params") or {}
            if params and hc.mode == RunMode.RUN:
                return {str(k): str(v) for k, v in params.items()}
    except Exception:  # not inside a Hydra app, or a sweeper without params
        pass
    return None


def git_info(repo: Path = REPO_DIR) -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    if os.environ.get("NANOSLG_COMMIT"):  # a copy of the tree whose .git is missing or stale (a GPU box)
        return {"commit": os.environ["NANOSLG_COMMIT"], "dirty": None}
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # absent (flashinfer on CPU) or broken: recorded as None
        return None
    return str(getattr(mod, "__version__", None))


def environment() -> dict:
    gpu: dict = {"name": None, "count": 0}
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {
        "gpu": gpu,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "versions": {
            "python": platform.python_version(),
            "torch": _version("torch"),
            "flashinfer": _version("flashinfer"),
            "transformers": _version("transformers"),
            "llguidance": _version("llguidance"),  # the structured-output presets' mask cost is its work
            "nanoslg": _version("nanoslg"),
        },
    }


ADHOC_DIR = Path("outputs") / "bench"  # Hydra's outputs/, which git ignores


def experiment_dir(bench_cfg) -> Path:
    """bench.output_dir/<name> when given; else a preset (bench.name set) keeps its results with the
    checkout's experiments/, and an ad-hoc run writes under outputs/bench/ of the working folder."""
    if bench_cfg.output_dir is not None:
        root = Path(bench_cfg.output_dir)
    else:
        root = REPO_DIR / "experiments" if bench_cfg.name else ADHOC_DIR
    return root / (bench_cfg.name or bench_cfg.workload)


def make_record(cfg: Any, results: dict, overrides: list[str] | None = None) -> dict:
    conf = config_dict(cfg)
    env = environment()
    return {
        "schema": 1,
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "workload": conf.get("bench", {}).get("workload"),
        "overrides": overrides if overrides is not None else hydra_overrides(),
        "argv": sys.argv,
        "config": conf,
        "git": git_info(),
        **env,
        "results": results,
    }


def config_hash(conf: dict) -> str:
    return hashlib.sha1(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()[:8]


def write_record(record: dict, folder: Path) -> Path:
    """Writes under folder/records/; the name is the time plus a hash of the config."""
    rec_dir = Path(folder) / "records"
    rec_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{config_hash(record['config'])}"
    path, k = rec_dir / f"{base}.json", 1
    while path.exists():  # the same config twice in one second
        path, k = rec_dir / f"{base}-{k}.json", k + 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=_json_default))
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    return str(o)
