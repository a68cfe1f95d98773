"""Triton kernels for AWQ int4 linears, over the layout nanoslg/model/quant/awq.py repacks to:
qweight int32 [K / 8, N] (input row 8i + j in bits 4j of row i), zeros uint8 [K / group, N], scales
float16 [K / group, N]. A K tile never spans two groups (BLOCK_K divides the group size), so each
tile loads one row of zeros and scales.

Three paths, by the number of rows M of x [M, K]:
- M == 1 (batch-1 decode): a GEMV without tensor cores. Each program reduces BLOCK_K inputs for
  BLOCK_N outputs, unpacking the eight values of an int32 with shifts and masks straight into float
  bits (no int-to-float conversion, which would cost more than the load); the K loop is split over
  programs when N alone gives too few programs to keep every SM reading, and the last split to
  finish adds the parts.
- M < DEQUANT_ROWS: a GEMM that dequantizes each tile in registers and feeds tl.dot.
Tile shapes and K splits per layer shape come from TABLE (measured), else a default.
- more rows (prefill): dequantize the weight once into a bf16/fp16 buffer and let cuBLAS multiply;
  the extra write is small next to the GEMM's FLOPs.

K splits write one float32 partial each, added in split order (by the GEMV's last split, or by a
kernel of their own) rather than by atomic adds, so a result never depends on the order programs
finish in: a CUDA graph replay and an eager step give the same bits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanoslg.core.pdl import gdc_launch_dependents, gdc_wait, pdl_ok
from nanoslg.model.quant.kernels import num_sms, silu_mul

DEQUANT_ROWS = 256  # from here on, dequantize + cuBLAS (vLLM's AWQ switches at the same count)
DEQUANT_BLOCK_N = 64


@triton.jit
def _load_x(x_ptr, offs, X_UP, SILU_MUL: tl.constexpr):
    """The GEMV's inputs at offs in float32. SILU_MUL: x holds [gate | up] (up from X_UP on), and the
    input is silu(gate) * up rounded to x's dtype, as the separate activation kernel would store it."""
    if SILU_MUL:
        g = tl.load(x_ptr + offs).to(tl.float32)
        u = tl.load(x_ptr + X_UP + offs).to(tl.float32)
        return silu_mul(g, u, x_ptr.dtype.element_ty)
    return tl.load(x_ptr + offs).to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, y_ptr, part_ptr, count_ptr, N, K_SPLIT, MASK, ONE, X_UP,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr, FUSED_SUM: tl.constexpr,
    X_VEC: tl.constexpr, MASK_ARG: tl.constexpr, SILU_MUL: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    if PDL:  # launched before the previous kernel ended: x is its output, read only from here on
        gdc_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.arange(0, BLOCK_K // 8)  # packed rows of a tile
    # Partial sums per packed row, reduced across rows once at the end: no cross-thread reduction
    # inside the loop, whose time is then the loads'.
    acc = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * K_SPLIT
    for k0 in range(k_begin, k_begin + K_SPLIT, BLOCK_K):
        packed = tl.load(qw_ptr + ((k0 // 8) + rows)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        g = k0 // GROUP  # one group per tile
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        # Nibble j is moved into the top of a float's mantissa under the exponent of 1.0, giving
        # 1 + q / 16 exactly with a shift and a mask (an int-to-float conversion costs more than the
        # load it follows); one 8-bit x times a 5-bit value is exact in float32.
        xq = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
        if X_VEC:  # a packed row's eight inputs in one 16-byte load, opened by splits (j = 4a + 2b + c)
            xr = _load_x(x_ptr, k0 + rows[:, None] * 8 + tl.arange(0, 8)[None, :], X_UP, SILU_MUL)
            x_c0, x_c1 = tl.split(tl.reshape(xr, [BLOCK_K // 8, 2, 2, 2]))
            x_b0c0, x_b1c0 = tl.split(x_c0)
            x_b0c1, x_b1c1 = tl.split(x_c1)
            x0, x4 = tl.split(x_b0c0)
            x2, x6 = tl.split(x_b1c0)
            x1, x5 = tl.split(x_b0c1)
            x3, x7 = tl.split(x_b1c1)
        for j in tl.static_range(8):
            if X_VEC:
                x = (x0, x1, x2, x3, x4, x5, x6, x7)[j]
            else:
                x = _load_x(x_ptr, k0 + rows * 8 + j, X_UP, SILU_MUL)
            if j < 5:
                bits = packed << (19 - 4 * j)
            else:
                bits = packed >> (4 * j - 19)
            if MASK_ARG:  # MASK, ONE = 0x780000, 0x3F800000 as arguments: ptxas keeps them in registers
                f = ((bits & MASK) | ONE).to(tl.float32, bitcast=True)
            else:  # immediates: a logic op takes one, and ptxas re-creates the other before most of them
                f = ((bits & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            xq += x[:, None] * f
            xsum += x
        # sum x (q - z) s = 16 s (sum x (1 + q / 16) - (1 + z / 16) sum x)
        acc += (16.0 * s)[None, :] * (xq - xsum[:, None] * (1.0 + z / 16.0)[None, :])
    if PDL:  # the next kernel may launch now; it waits for this one's stores before it reads them
        gdc_launch_dependents()
    out = tl.sum(acc, axis=0)
    if SPLITS == 1:
        tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)
    elif not FUSED_SUM:
        tl.store(part_ptr + pid_k * N + offs_n, out, mask=n_mask)  # split pid_k's part, summed by _finish
    else:
        # Each split stores its part and counts itself done; the split that finds the others done
        # adds the parts in split order (the same sum as _finish, whichever split finishes last) and
        # sets the count back to 0 for the next call. The barrier puts every thread's store before
        # the count's release; the parts are read past L1 (.cg), which may hold an older call's.
        tl.store(part_ptr + pid_k * N + offs_n, out, mask=n_mask)
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLITS - 1:
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for i in tl.static_range(SPLITS):
                total += tl.load(part_ptr + i * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")


@triton.jit
def _dequant_tile(
    qw_ptr, z_ptr, s_ptr, k0, offs_n, n_mask, N, g, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, dtype: tl.constexpr
):
    """The [BLOCK_K, BLOCK_N] weight tile of input rows k0.. (all in group g), in `dtype`. Each int32 is
    loaded once and opened into its eight values; q | 0x4B000000 read as a float is 2^23 + q, so one
    subtraction gives q - z exactly, without an int-to-float conversion."""
    rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    packed = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
    q = (packed[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF  # [BLOCK_K / 8, 8, BLOCK_N]
    f = (q | 0x4B000000).to(tl.float32, bitcast=True)
    z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
    w = (f - (z + 8388608.0)[None, None, :]) * s[None, None, :]
    return tl.reshape(w, (BLOCK_K, BLOCK_N)).to(dtype)


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
        dtype = x_ptr.dtype.element_ty
        w = _dequant_tile(qw_ptr, z_ptr, s_ptr, k0, offs_n, n_mask, N, k0 // GROUP, BLOCK_K, BLOCK_N, dtype)
        acc = tl.dot(x, w, acc)
    ptrs = y_ptr + (pid_k * M + offs_m[:, None]) * stride_ym + offs_n[None, :]  # split pid_k's part
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dequant_kernel(qw_ptr, z_ptr, s_ptr, w_ptr, N, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    dtype = w_ptr.dtype.element_ty
    w = _dequant_tile(qw_ptr, z_ptr, s_ptr, k0, offs_n, n_mask, N, k0 // GROUP, BLOCK_K, BLOCK_N, dtype)
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


PROGRAMS_PER_SM = 4  # without a table entry: K splits until about this many programs per SM run


def split_k(programs: int, k_tiles: int, device: torch.device, per_sm: int = PROGRAMS_PER_SM) -> int:
    """K splits so that about per_sm programs per SM run: the largest divisor of k_tiles up to that."""
    want = max(1, -(-per_sm * num_sms(device) // programs))
    return max(d for d in range(1, min(want, k_tiles) + 1) if k_tiles % d == 0)


class Tiles(NamedTuple):
    block_n: int
    block_k: int  # at most the group size (block_k() caps a table's entry)
    warps: int
    splits: int  # of K; a divisor of the K tiles (else the largest one below)
    stages: int = 2
    x_vec: bool = False  # the GEMV: x's eight inputs of a packed row in one load (else one load each)
    mask_arg: bool = False  # the GEMV: the nibble mask and the exponent of 1.0 passed as arguments


# (N, K, rows) -> the tiles measured fastest on an H100 (experiments/quant_kernels.py --sweep, and
# --awq-gemv for the GEMV with its last split adding the parts) for Llama-3.1-8B's qkv, o, gate_up and
# down at group 128; rows: 1 (the GEMV) or the GEMM's BLOCK_M.
TABLE: dict[tuple[int, int, int], Tiles] = {
    (6144, 4096, 1): Tiles(256, 128, 4, 16, x_vec=True, mask_arg=True),
    (4096, 4096, 1): Tiles(128, 64, 2, 32, x_vec=True, mask_arg=True),
    (28672, 4096, 1): Tiles(512, 64, 4, 16, x_vec=True, mask_arg=True),
    (4096, 14336, 1): Tiles(128, 64, 2, 32, x_vec=True, mask_arg=True),
    (6144, 4096, 16): Tiles(128, 64, 4, 8, 3),
    (4096, 4096, 16): Tiles(128, 64, 4, 8, 3),
    (28672, 4096, 16): Tiles(128, 128, 4, 2, 3),
    (4096, 14336, 16): Tiles(128, 64, 4, 16, 3),
    (4096, 4096, 64): Tiles(128, 64, 4, 8, 3),
    (28672, 4096, 64): Tiles(128, 64, 4, 2, 3),
    (4096, 14336, 64): Tiles(128, 128, 4, 8, 3),
}


def tiles(rows: int, n: int, k: int, group: int, device: torch.device) -> Tiles:
    """The table's entry for these rows (1: the GEMV, else the GEMM's row block), else a default;
    block_k capped to a divisor of the group, splits to a divisor of the K tiles."""
    t = TABLE.get((n, k, rows)) or (Tiles(128, 128, 4, 0) if rows == 1 else Tiles(128, 64, 4, 0, 3))
    bk = min(t.block_k, block_k(group))
    k_tiles = k // bk
    programs = triton.cdiv(n, t.block_n)
    splits = t.splits or split_k(programs, k_tiles, device)
    splits = max(d for d in range(1, min(splits, k_tiles) + 1) if k_tiles % d == 0)
    return t._replace(block_k=bk, splits=splits)


def _output(m: int, n: int, splits: int, like: torch.Tensor) -> torch.Tensor:
    """The result [m, n], or with K splits a float32 part per split [splits, m, n] (summed after)."""
    if splits == 1:
        return torch.empty(m, n, dtype=like.dtype, device=like.device)
    return torch.empty(splits, m, n, dtype=torch.float32, device=like.device)


def dequantize(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int, dtype) -> torch.Tensor:
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    w = torch.empty(k, n, dtype=dtype, device=qweight.device)
    bk = block_k(group)
    _dequant_kernel[(k // bk, triton.cdiv(n, DEQUANT_BLOCK_N))](
        qweight, zeros, scales, w, n, GROUP=group, BLOCK_K=bk, BLOCK_N=DEQUANT_BLOCK_N
    )
    return w


def gemm_rows(m: int) -> int:
    """The GEMM's row block for m rows (tl.dot takes 16 at least)."""
    return 16 if m <= 16 else 32 if m <= 32 else 64


def split_counts(n: int, device) -> torch.Tensor:
    """The counters a GEMV with K splits uses to let its last split add the parts (one per column
    block, BLOCK_N 16 at the least), zero between calls. A linear keeps its own, so two linears never
    share one."""
    return torch.zeros(triton.cdiv(n, 16), dtype=torch.int32, device=device)


def awq_linear(
    x: torch.Tensor,
    qweight,
    zeros,
    scales,
    group: int,
    cfg: Tiles | None = None,
    counts: torch.Tensor | None = None,
    silu_mul: bool = False,
) -> torch.Tensor:
    """x [M, K] (bf16 or fp16) @ the int4 weight -> [M, N] in x's dtype. cfg: tiles other than the
    table's (experiments/quant_kernels.py tries them). counts (split_counts): the GEMV sums its K
    splits in its own last split, else in a kernel of its own. silu_mul (the GEMV only): x is
    [1, 2K] = [gate | up], and the GEMV multiplies silu(gate) * up, computed as it loads it."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    if silu_mul:
        if m != 1 or k != 2 * qweight.shape[0] * 8:
            want = f"[1, {2 * qweight.shape[0] * 8}]"
            raise ValueError(f"silu_mul takes one row of [gate | up], {want}; got {list(x.shape)}")
        k //= 2
    if m >= DEQUANT_ROWS:
        return x @ dequantize(qweight, zeros, scales, group, x.dtype)
    rows = 1 if m == 1 else gemm_rows(m)
    t = cfg or tiles(rows, n, k, group, x.device)
    k_split = k // t.splits
    if m == 1:
        fused = t.splits > 1 and counts is not None
        if fused and counts.numel() < triton.cdiv(n, t.block_n):
            raise ValueError(f"{counts.numel()} split counters for {triton.cdiv(n, t.block_n)} column blocks")
        y = torch.empty(1, n, dtype=x.dtype, device=x.device) if t.splits == 1 or fused else None
        parts = _output(1, n, t.splits, x) if t.splits > 1 else y
        _gemv_kernel[(triton.cdiv(n, t.block_n), t.splits)](
            x, qweight, zeros, scales, y if y is not None else parts, parts, counts if fused else parts, n, k_split,
            0x780000, 0x3F800000, k, GROUP=group, BLOCK_N=t.block_n, BLOCK_K=t.block_k, SPLITS=t.splits,
            FUSED_SUM=fused, X_VEC=t.x_vec, MASK_ARG=t.mask_arg, SILU_MUL=silu_mul, num_warps=t.warps,
            num_stages=t.stages, **({"PDL": True, "launch_pdl": True} if pdl_ok(x.device) else {}),
        )  # fmt: skip
        return y if y is not None else _finish(parts, x.dtype)
    y = _output(m, n, t.splits, x)
    grid = (triton.cdiv(m, rows), triton.cdiv(n, t.block_n), t.splits)
    _gemm_kernel[grid](
        x, qweight, zeros, scales, y, m, n, k_split, x.stride(0), n,
        GROUP=group, BLOCK_M=rows, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.warps, num_stages=t.stages,
    )  # fmt: skip
    return y if t.splits == 1 else _finish(y, x.dtype)
