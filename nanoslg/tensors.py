"""Host-to-device copies that never wait for the GPU.

`torch.tensor(data, device="cuda")` copies from pageable memory and then synchronizes the stream,
which would stall the CPU until every queued kernel ran: overlap scheduling needs the opposite.
Pinned staging plus a non-blocking copy returns at once and stays in stream order.
"""
from __future__ import annotations

import torch


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
