"""Fused GPU kernels (FlashInfer) with plain-torch twins.

The torch versions are the reference and the CPU path; `tests/test_kernels.py` checks that both
give the same numbers on the GPU. `use_fused()` decides per tensor: CUDA and FlashInfer importable.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def load_flashinfer():
    try:
        import flashinfer  # noqa: F401

        return flashinfer
    except Exception:  # not installed, or no GPU build: the torch path serves
        return None


_ENABLED = True


def set_fused(enabled: bool) -> None:
    """Tests turn fused kernels off to compare against the torch path."""
    global _ENABLED
    _ENABLED = enabled


def use_fused(x: torch.Tensor) -> bool:
    return _ENABLED and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and load_flashinfer() is not None


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Over the last dim. A 3-D x [T, heads, D] (Qwen3's per-head q/k norm) may be a strided view of
    the fused qkv output: FlashInfer's warp-per-head kernel reads it in place and writes a contiguous
    result, instead of a copy and one 16-thread block per head."""
    if use_fused(x) and x.dim() in (2, 3) and x.stride(-1) == 1:
        return load_flashinfer().norm.rmsnorm(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual; returns (rms_norm(residual), residual)."""
    if use_fused(x) and x.dim() == 2:
        x, residual = x.contiguous(), residual.contiguous()
        load_flashinfer().norm.fused_add_rmsnorm(x, residual, weight, eps)  # in place, both tensors
        return x, residual
    residual = x + residual
    return rms_norm_torch(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] on the last dim -> silu(gate) * up."""
    if use_fused(x):
        return load_flashinfer().activation.silu_and_mul(x.contiguous())
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rope_torch(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary on q [T, Hq, D], k [T, Hk, D]; cos_sin [max_pos, D] (cos half | sin half), fp32."""
    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)


def rope(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place on the GPU: q and k may be strided views of the fused qkv output (the kernel takes
    head and token strides), so no copy is made."""
    if use_fused(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
        load_flashinfer().rope.apply_rope_with_cos_sin_cache_inplace(positions, q, k, q.shape[-1], cos_sin, True)
        return q, k
    return rope_torch(positions, q, k, cos_sin)
