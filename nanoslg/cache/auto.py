"""`cache.backend=auto`: pick the KV backend for this device, and say why (for the log)."""

from __future__ import annotations

import torch

from nanoslg.core.config import CacheConfig

# The backend `auto` picks on the CPU. "sdpa" keeps the plain path (no prefix tree); "paged" would turn prefix
# caching on for CPU runs too. One constant so that choice is made in one place.
CPU_DEFAULT = "sdpa"
MIN_FLASHINFER_SM = (8, 0)


def flashinfer_status(device: torch.device) -> tuple[bool, str]:
    """Whether FlashInfer can run on `device`, and the reason when it cannot."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_FLASHINFER_SM:
        return False, f"GPU is SM{major}{minor}; FlashInfer needs SM80 or newer"
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # ImportError, or a broken build raising something else at import
        return False, f"`import flashinfer` failed ({type(e).__name__}: {e})"
    return True, f"SM{major}{minor} and flashinfer {getattr(flashinfer, '__version__', '?')} imports"


def resolve_backend(cache_cfg: CacheConfig, device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, str]:
    """(backend name, reason). Names other than `auto` are taken as given. With the model dtype
    known, auto also avoids FlashInfer for float32, which it does not run."""
    name = cache_cfg.backend
    if name != "auto":
        return name, f"set by cache.backend={name}"
    if device.type != "cuda":
        return CPU_DEFAULT, f"auto on CPU: {CPU_DEFAULT}"
    ok, why = flashinfer_status(device)
    if ok and dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        ok, why = False, f"the model runs in {str(dtype).replace('torch.', '')}; FlashInfer needs bf16/fp16"
    if ok:
        return "flashinfer", f"auto: {why}"
    return "sdpa", f"auto: sdpa because {why}"
