"""Host-to-device copies that never wait for the GPU.

`torch.tensor(data, device="cuda")` copies from pageable memory and then synchronizes the stream,
which would stall the CPU until every queued kernel ran: overlap scheduling needs the opposite.
Pinned staging plus a non-blocking copy returns at once and stays in stream order. Lists go through
numpy, which converts the page tables a step builds much faster than torch.tensor does.

Pinning memory per call (`tensor.pin_memory()`) showed up in a cProfile of the shared-prefix
benchmark (experiments/host_profile.py; experiments/README.md), several calls a step, so the staging
memory is allocated once: a ring of pinned buffers, one taken per step (`next_step`), each reused
only once the copies of the step that last filled it have run.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

_NUMPY = {torch.long: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}
_TORCH = {np.dtype(v): k for k, v in _NUMPY.items()}


class PinnedStaging:
    SLOTS = 4  # steps whose copies may still be queued: two in flight, and slack

    def __init__(self, slot_bytes: int = 1 << 20):
        self.bufs: list[torch.Tensor | None] = [None] * self.SLOTS
        self.events: list[torch.cuda.Event | None] = [None] * self.SLOTS
        self.slot, self.offset, self.slot_bytes = 0, 0, slot_bytes
        self.lock = threading.Lock()

    def next_step(self) -> None:
        """Later copies stage in the next buffer (called once per step, on the step's stream)."""
        with self.lock:
            self._advance()

    def _advance(self) -> None:
        if self.bufs[self.slot] is not None:
            self._record(self.slot)  # after every copy this buffer fed, on the stream that queued them
        self.slot, self.offset = (self.slot + 1) % self.SLOTS, 0
        if self.events[self.slot] is not None:
            self._wait(self.slot)  # the step SLOTS ago: long done

    # The CUDA specifics, apart so the ring's logic is tested on the CPU.
    def _alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _record(self, slot: int) -> None:
        ev = self.events[slot] = self.events[slot] or torch.cuda.Event()
        ev.record()

    def _wait(self, slot: int) -> None:
        ev = self.events[slot]
        if not ev.query():  # a synchronize would hand the GIL to the loop thread even when done
            ev.synchronize()

    def host(self, arr: np.ndarray) -> torch.Tensor:
        """A pinned tensor holding arr, valid until its buffer comes round again."""
        out = self._bytes(arr.nbytes).view(_TORCH[arr.dtype]).view(arr.shape)
        out.numpy()[...] = arr
        return out

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """Pinned, uninitialized; valid until its buffer comes round again (SLOTS steps later)."""
        return self._bytes(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)

    def _bytes(self, nbytes: int) -> torch.Tensor:
        n = max(nbytes, 1)
        with self.lock:
            if self.offset + n > self.slot_bytes and self.offset:
                self._advance()
            buf = self.bufs[self.slot]
            if buf is None or buf.numel() < max(n, self.slot_bytes):
                self.slot_bytes = max(self.slot_bytes, 1 << (n - 1).bit_length())
                buf = self.bufs[self.slot] = self._alloc(self.slot_bytes)
            start = self.offset
            self.offset += -(-n // 8) * 8  # keep every view 8-byte aligned
        return buf[start : start + nbytes]


STAGING = PinnedStaging()


def _array(data, dtype: torch.dtype) -> np.ndarray:
    return np.asarray(data, dtype=_NUMPY[dtype])


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if dtype not in _NUMPY:
        return torch.tensor(data, dtype=dtype).to(device)
    arr = _array(data, dtype)
    if device.type != "cuda":
        return torch.from_numpy(arr).to(device)
    return STAGING.host(arr).to(device, non_blocking=True)


def pinned(data, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor a kernel library may copy from without blocking (FlashInfer's plan() inputs)."""
    arr = _array(data, dtype)
    return STAGING.host(arr) if torch.cuda.is_available() else torch.from_numpy(arr)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Starts a non-blocking device-to-host copy into staging memory; read it after an event that
    follows the copy (and within SLOTS steps)."""
    if not t.is_cuda:
        return t
    out = STAGING.empty(t.shape, t.dtype)
    out.copy_(t, non_blocking=True)
    return out
