"""Triton kernels for AWQ int4 linears, over the layout nanoslg/model/quant/awq.py repacks to:
qweight int32 [K / 8, N] (input row 8i + j in bits 4j of row i), zeros uint8 [K / group, N], scales
float16 [K / group, N]. A K tile never spans two groups (BLOCK_K divides the group size), so each
tile loads one row of zeros and scales.

Three paths, by the number of rows M of x [M, K]:
- M == 1 (batch-1 decode): a GEMV without tensor cores. Each program reduces BLOCK_K inputs for
  BLOCK_N outputs as s * (sum x q - zero * sum x); the K loop is split over programs when N alone
  gives too few programs to keep every SM reading.
- M < DEQUANT_ROWS: a GEMM that dequantizes each tile in registers and feeds tl.dot.
- more rows (prefill): dequantize the weight once into a bf16/fp16 buffer and let cuBLAS multiply;
  the extra write is small next to the GEMM's FLOPs.

K splits write one float32 partial each, summed afterwards rather than by atomics, so a result never
depends on the order programs finish in: a CUDA graph replay and an eager step give the same bits.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

DEQUANT_ROWS = 256  # from here on, dequantize + cuBLAS (vLLM's AWQ switches at the same count)
GEMV_BLOCK_N = 64
GEMM_BLOCK_N = 64


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, y_ptr, N, K_SPLIT, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.arange(0, BLOCK_K // 8)  # packed rows of a tile
    nib = tl.arange(0, 8)
    shifts = nib * 4
    # Partial sums per packed row, reduced across rows once at the end: no cross-thread reduction
    # inside the loop, whose time is then the loads'.
    acc = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * K_SPLIT
    for k0 in range(k_begin, k_begin + K_SPLIT, BLOCK_K):
        packed = tl.load(qw_ptr + ((k0 // 8) + rows)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        q = ((packed[:, None, :] >> shifts[None, :, None]) & 0xF).to(tl.float32)  # [BLOCK_K / 8, 8, BLOCK_N]
        x = tl.load(x_ptr + k0 + rows[:, None] * 8 + nib[None, :]).to(tl.float32)  # [BLOCK_K / 8, 8]
        g = k0 // GROUP  # one group per tile: sum x (q - z) s = s (sum x q - z sum x)
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        xq = tl.sum(x[:, :, None] * q, axis=1)  # [BLOCK_K / 8, BLOCK_N]
        acc += s[None, :] * (xq - z[None, :] * tl.sum(x, axis=1)[:, None])
    out = tl.sum(acc, axis=0)
    tl.store(y_ptr + pid_k * N + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)  # split pid_k's part


@triton.jit
def _dequant_tile(qw_ptr, z_ptr, s_ptr, offs_k, offs_n, n_mask, N, g, dtype: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] weight tile of input rows offs_k (all in group g), in `dtype`."""
    packed = tl.load(qw_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=n_mask[None, :], other=0)
    q = ((packed >> ((offs_k[:, None] % 8) * 4)) & 0xF).to(tl.float32)
    z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
    return ((q - z[None, :]) * s[None, :]).to(dtype)


@triton.jit
def _gemm_kernel(
    x_ptr,
    qw_ptr,
    z_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K_SPLIT,
    stride_xm,
    stride_ym,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * K_SPLIT
    for k0 in range(k_begin, k_begin + K_SPLIT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        w = _dequant_tile(qw_ptr, z_ptr, s_ptr, offs_k, offs_n, n_mask, N, k0 // GROUP, x_ptr.dtype.element_ty)
        acc = tl.dot(x, w, acc)
    ptrs = y_ptr + (pid_k * M + offs_m[:, None]) * stride_ym + offs_n[None, :]  # split pid_k's part
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dequant_kernel(qw_ptr, z_ptr, s_ptr, w_ptr, N, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    g = tl.program_id(0) * BLOCK_K // GROUP
    w = _dequant_tile(qw_ptr, z_ptr, s_ptr, offs_k, offs_n, n_mask, N, g, w_ptr.dtype.element_ty)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w, mask=n_mask[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, y_ptr, SIZE, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """y = the float32 parts [SPLITS, SIZE] summed, in y's dtype: one kernel where sum + cast are two."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SIZE
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(SPLITS):
        acc += tl.load(part_ptr + i * SIZE + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _finish(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The result from its K splits' float32 parts [splits, m, n]."""
    splits, m, n = parts.shape
    if splits == 1:
        return parts[0].to(dtype)
    y = torch.empty(m, n, dtype=dtype, device=parts.device)
    block = 1024
    _sum_splits_kernel[(triton.cdiv(m * n, block),)](parts, y, m * n, SPLITS=splits, BLOCK=block)
    return y


def block_k(group: int) -> int:
    """The K tile: at most 128, dividing the group size (a multiple of 16, checked at load)."""
    bk = 128
    while group % bk:
        bk //= 2
    return bk


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the Triton interpreter (tests on the CPU)
    return torch.cuda.get_device_properties(device).multi_processor_count


PROGRAMS_PER_SM = 4  # loads in flight enough to keep HBM busy: a first guess, experiments/quant_kernels.py measures it


def split_k(programs: int, k_tiles: int, device: torch.device) -> int:
    """K splits so that about PROGRAMS_PER_SM programs per SM run: the largest divisor of k_tiles up to that."""
    want = max(1, -(-PROGRAMS_PER_SM * _num_sms(device) // programs))
    return max(d for d in range(1, min(want, k_tiles) + 1) if k_tiles % d == 0)


def _output(m: int, n: int, splits: int, like: torch.Tensor) -> torch.Tensor:
    """The result [m, n], or with K splits a float32 part per split [splits, m, n] (summed after)."""
    if splits == 1:
        return torch.empty(m, n, dtype=like.dtype, device=like.device)
    return torch.empty(splits, m, n, dtype=torch.float32, device=like.device)


def dequantize(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int, dtype) -> torch.Tensor:
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    w = torch.empty(k, n, dtype=dtype, device=qweight.device)
    bk = block_k(group)
    _dequant_kernel[(k // bk, triton.cdiv(n, GEMM_BLOCK_N))](
        qweight, zeros, scales, w, n, GROUP=group, BLOCK_K=bk, BLOCK_N=GEMM_BLOCK_N
    )
    return w


def awq_linear(x: torch.Tensor, qweight, zeros, scales, group: int) -> torch.Tensor:
    """x [M, K] (bf16 or fp16) @ the int4 weight -> [M, N] in x's dtype."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    if m >= DEQUANT_ROWS:
        return x @ dequantize(qweight, zeros, scales, group, x.dtype)
    bk = block_k(group)
    k_tiles = k // bk
    if m == 1:
        programs = triton.cdiv(n, GEMV_BLOCK_N)
        splits = split_k(programs, k_tiles, x.device)
        y = _output(1, n, splits, x)
        _gemv_kernel[(programs, splits)](
            x, qweight, zeros, scales, y, n, k // splits, GROUP=group, BLOCK_N=GEMV_BLOCK_N, BLOCK_K=bk
        )
    else:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        programs = triton.cdiv(m, bm) * triton.cdiv(n, GEMM_BLOCK_N)
        splits = split_k(programs, k_tiles, x.device)
        y = _output(m, n, splits, x)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, GEMM_BLOCK_N), splits)
        _gemm_kernel[grid](
            x,
            qweight,
            zeros,
            scales,
            y,
            m,
            n,
            k // splits,
            x.stride(0),
            n,
            GROUP=group,
            BLOCK_M=bm,
            BLOCK_N=GEMM_BLOCK_N,
            BLOCK_K=bk,
        )
    return y if splits == 1 else _finish(y, x.dtype)
