"""GPU kernels of the quantization methods (Triton, torch._scaled_mm). Imported only when a method picks
a GPU kernel, so CPU installs never import Triton; each has a plain-torch twin in its method's file."""

import functools
import os

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch (SM90): in Triton since 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pdl_ok is then False and no kernel is compiled with a call to them
    gdc_launch_dependents = gdc_wait = None


@functools.cache
def num_sms(device: torch.device) -> int:
    """The GPU's SM count, which K-split heuristics size their grids by; 8 off CUDA (the Triton
    interpreter, tests on the CPU)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def pdl_ok(device: torch.device) -> bool:
    """Whether kernels here launch as programmatic dependents (SM90+, a Triton with griddepcontrol; not
    in the interpreter): a kernel then starts while the one before it finishes, and waits for it with
    gdc_wait before it reads that kernel's output."""
    if gdc_wait is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


@triton.jit
def prefetch_l2(w_ptr, offs_n, n_mask, stride_wn, k_lo, k_hi, LINES: tl.constexpr):
    """Requests rows offs_n of w [N, K] (bytes), columns k_lo..k_hi, toward L2 in 128-byte lines, without
    waiting for them: the loads that follow find them there or on the way."""
    offs = k_lo + tl.arange(0, LINES) * 128
    mask = n_mask[:, None] & (offs < k_hi)[None, :]
    ptrs = tl.where(mask, w_ptr + offs_n[:, None] * stride_wn + offs[None, :], w_ptr)
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )
