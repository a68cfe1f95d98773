"""GPU kernels of the quantization methods (Triton, torch._scaled_mm). Imported only when a method picks
a GPU kernel, so CPU installs never import Triton; each has a plain-torch twin in its method's file."""

import functools

import torch


@functools.cache
def num_sms(device: torch.device) -> int:
    """The GPU's SM count, which K-split heuristics size their grids by; 8 off CUDA (the Triton
    interpreter, tests on the CPU)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count
