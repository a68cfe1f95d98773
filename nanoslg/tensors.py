"""Host-to-device copies that never wait for the GPU.

`torch.tensor(data, device="cuda")` copies from pageable memory and then synchronizes the stream,
which would stall the CPU until every queued kernel ran: overlap scheduling needs the opposite.
Pinned staging plus a non-blocking copy returns at once and stays in stream order. Lists go through
numpy, about 4x faster than torch.tensor on the page tables a step builds.
"""
from __future__ import annotations

import numpy as np
import torch

_NUMPY = {torch.long: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(np.asarray(data, dtype=_NUMPY[dtype])) if dtype in _NUMPY \
        else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
