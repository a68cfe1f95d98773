"""GPU kernels of the quantization methods (Triton, torch._scaled_mm). Imported only when a method picks
a GPU kernel, so CPU installs never import Triton; each has a plain-torch twin in its method's file."""

import functools

import torch
import triton
import triton.language as tl


@functools.cache
def num_sms(device: torch.device) -> int:
    """The GPU's SM count, which K-split heuristics size their grids by; 8 off CUDA (the Triton
    interpreter, tests on the CPU)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def silu_mul(g, u, dtype: tl.constexpr):
    """silu(g) * u of float32 g and u, rounded to dtype and back to float32: the activation kernel's
    expression, so the GEMVs that fuse it (AWQ's, FP8's at one row) give that kernel's bits."""
    return (g / (1.0 + tl.exp(-g)) * u).to(dtype).to(tl.float32)
