"""Greedy picks on the GPU: each row's argmax over the vocabulary in two Triton kernels.

torch's argmax reduces a row in one thread block, so at batch-1 decode one SM reads the whole
vocabulary while the rest idle. Here a program per chunk of a row finds the chunk's largest logit
(the first index among equals), and one program a row takes the first chunk holding the row's
largest: torch.argmax's index, by comparisons only. Rows are expected free of NaN (torch would
return a NaN's index; these kernels compare NaN as nothing)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 2048  # logits a program of the first kernel reads


@triton.jit
def _chunk_max_kernel(x_ptr, val_ptr, idx_ptr, V, stride, CHUNKS, BLOCK: tl.constexpr):
    row, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
    v, i = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + row * CHUNKS + c, v)
    tl.store(idx_ptr + row * CHUNKS + c, c * BLOCK + i)


@triton.jit
def _pick_kernel(val_ptr, idx_ptr, out_ptr, CHUNKS, C_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, C_BLOCK)
    v = tl.load(val_ptr + row * CHUNKS + offs, mask=offs < CHUNKS, other=-float("inf"))
    _, j = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.load(idx_ptr + row * CHUNKS + j).to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] (float32, bf16 or fp16) -> [B] int64: torch.argmax(x, dim=-1), in two kernels."""
    if x.dim() != 2:
        raise ValueError(f"argmax_rows takes [B, V] logits; got {list(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    b, v = x.shape
    if b == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    chunks = triton.cdiv(v, CHUNK)
    vals = torch.empty(b, chunks, dtype=torch.float32, device=x.device)
    idx = torch.empty(b, chunks, dtype=torch.int32, device=x.device)
    out = torch.empty(b, dtype=torch.int64, device=x.device)
    _chunk_max_kernel[(b, chunks)](x, vals, idx, v, x.stride(0), chunks, BLOCK=CHUNK, num_warps=4)
    _pick_kernel[(b,)](vals, idx, out, chunks, C_BLOCK=max(16, triton.next_power_of_2(chunks)), num_warps=1)
    return out
