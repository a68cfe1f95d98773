"""FP8 GEMMs for nanoslg/model/quant/fp8.py: activations to float8 per token (one Triton kernel: a
row's absolute max, then the row divided by max / 448), then torch._scaled_mm, which multiplies on
the FP8 tensor cores and applies both scales in its epilogue."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1e-12  # as the reference's: an all-zero row quantizes to zeros


@triton.jit
def _quant_rows_kernel(
    x_ptr, q_ptr, s_ptr, K, stride_x, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX, MIN_SCALE)
    for start in range(0, K, BLOCK):  # the second pass reads the row back from L2
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * K + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
    tl.store(s_ptr + row, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 [M, K], scale [M, 1] float32), per row."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = min(triton.next_power_of_2(k), 4096)
    _quant_rows_kernel[(m,)](x, q, s, k, x.stride(0), BLOCK=block, FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE, num_warps=8)
    return q, s


@functools.cache
def _one(device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32, device=device)


def fp8_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act_scale: torch.Tensor | None, kernel: str
) -> torch.Tensor:
    """x [M, K] @ (w [N, K] float8 * w_scale [N])^T -> [M, N] in x's dtype. kernel: "rowwise" (SM90+:
    both scales in _scaled_mm's epilogue) or "tensorwise" (SM89: unit scales, both applied after)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    if act_scale is None:
        q, s = quantize_rows(x)
    else:  # a checkpoint's static scale, one for every token
        q = (x.float() / act_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        s = act_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    if kernel == "rowwise":  # row-wise scaling takes a bf16 output only
        y = torch._scaled_mm(q, w.t(), scale_a=s, scale_b=w_scale.view(1, -1), out_dtype=torch.bfloat16)
    else:
        one = _one(x.device)
        y = torch._scaled_mm(q, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32) * s * w_scale
    return y if y.dtype == x.dtype else y.to(x.dtype)
