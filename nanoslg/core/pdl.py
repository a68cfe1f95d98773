"""Programmatic dependent launch (SM90+) for our Triton kernels: a kernel launched with `launch_pdl`
may start while the kernel before it in the stream is still finishing; it calls `gdc_wait` before it
reads anything that kernel wrote, and `gdc_launch_dependents` to let the next one start early. Both are
no-ops in a kernel launched without it. FlashInfer's norm and attention kernels launch this way on
SM90, so a batch-1 step's kernel boundaries overlap only where ours do too."""

import functools
import os

import torch

try:  # older Triton releases lack griddepcontrol
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pdl_ok is then False and no kernel is compiled with a call to them
    gdc_launch_dependents = gdc_wait = None


@functools.cache
def pdl_ok(device: torch.device) -> bool:
    """Whether our kernels launch as programmatic dependents on `device`: SM90+, a Triton with
    griddepcontrol, and not Triton's interpreter (the CPU tests)."""
    if gdc_wait is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)
