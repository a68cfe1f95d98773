"""FP8 GEMMs for nanoslg/model/quant/fp8.py. Both take x's rows to float8 per token (scale = the row's
absolute max / 448, the reference's rounding) and multiply by the float8 weight [N, K] with its
per-output-channel scale:
- few rows (decode): a skinny Triton kernel that reads the weight once, at bandwidth, and quantizes
  x on the fly (below);
- more rows: one Triton kernel rounds the rows (quantize_rows), then torch._scaled_mm multiplies on
  the FP8 tensor cores and applies both scales in its epilogue.
K splits write float32 parts added in split order (by the last split to finish, or by a kernel of
their own) rather than by atomic adds, so a CUDA graph replay and an eager step give the same bits.
On SM90 the skinny kernel launches as a programmatic dependent (core/pdl.py): it starts while the
kernel before it finishes and waits for it before it reads x, which hides the launch gap at batch 1.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanoslg.core.pdl import gdc_launch_dependents, gdc_wait, pdl_ok
from nanoslg.model.quant.kernels import num_sms, silu_mul

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


# Few rows (batch-1 and small-batch decode): torch._scaled_mm spends most of its time on a tile
# shape made for large M, so a skinny kernel reads the weight once at full bandwidth instead: x comes
# rounded by quantize_rows and the kernel multiplies on tensor cores. The kernel can also take one
# row unrounded and multiply with FMAs (a little faster at batch 1: experiments/quant_kernels.py),
# but fp8_linear does not use that path: its sums would differ in the last bit from the tensor-core
# ones, and a row's result must not depend on the step's row count.
# Up to this many rows the skinny kernel on tensor cores, one row included, in tiles of 16 rows: a row's
# result then does not depend on how many rows the step has (overlap scheduling and graph buckets
# change that count, and FP8 rounding of the next layer turns a last-bit difference into a token).
SKINNY_ROWS = 64
DOT_ROWS = 16
X_DYNAMIC, X_STATIC, X_FP8 = 0, 1, 2  # x: quantized here per row / with one static scale / already float8
X_ONE_ROW = 3  # x: one row, quantized here once per K tile (fp8_linear at batch-1 decode)
X_ONE_ROW_SLOTS = 4  # as X_ONE_ROW, the row's absolute max taken from the kernel before's per-program maxima
AMAX_K = 1024  # X_ONE_ROW: the step through the row (or the maxima) for its absolute max


@triton.jit
def _one_row(x_ptr, offs, mask, X_UP, SILU_MUL: tl.constexpr):
    """X_ONE_ROW's input at offs in float32. SILU_MUL: x holds [gate | up] (up from X_UP on) and the
    input is silu(gate) * up rounded to x's dtype, as the activation kernel stores it."""
    if SILU_MUL:
        g = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + X_UP + offs, mask=mask, other=0.0).to(tl.float32)
        return silu_mul(g, u, x_ptr.dtype.element_ty)
    return tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, ws_ptr, xs_ptr, y_ptr, out_ptr, count_ptr, slot_ptr, M, N, K, K_SPLIT, N_SLOTS, stride_xm,
    stride_wn, X_MODE: tl.constexpr, PARTS: tl.constexpr, SPLITS: tl.constexpr, FUSED_SUM: tl.constexpr,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, AMAX_K: tl.constexpr,
    FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, SILU_MUL: tl.constexpr = False, GATE_UP: tl.constexpr = False,
    PDL: tl.constexpr = False,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    if GATE_UP:  # w = [gate; up]: a program takes gate's columns c and up's c + N / 2, side by side
        cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) // 2
        offs_n = cols + (tl.arange(0, BLOCK_N) % 2) * (N // 2)
        n_mask = cols < N // 2
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    k_begin = pid_k * K_SPLIT
    if PDL:  # launched before the previous kernel ended: x is its output, read only from here on
        gdc_wait()
    if X_MODE == 0:
        amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + offs_kb
            x = tl.load(x_rows + offs[None, :], mask=m_mask[:, None] & (offs < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        s = tl.maximum(tl.max(amax, axis=1) / FP8_MAX, MIN_SCALE)
        if PARTS:  # the scales for the sum of the parts; every program computed the same ones
            tl.store(xs_ptr + offs_m, s, mask=m_mask & (offs_m * 0 + pid_n + pid_k == 0))
    elif X_MODE >= 3:
        # One row, quantized as quantize_rows does it (the same scale and rounding, so the same bits),
        # without a launch of its own. Each K tile of the row is divided once, as a vector; the padding
        # rows of the dot tile are zeros (quantizing a whole 16-row tile in the loop is much slower).
        amax1 = tl.zeros([AMAX_K], dtype=tl.float32)
        if X_MODE == 3:
            for k0 in range(0, K, AMAX_K):
                offs = k0 + tl.arange(0, AMAX_K)
                amax1 = tl.maximum(amax1, tl.abs(_one_row(x_ptr, offs, offs < K, K, SILU_MUL)))
        else:  # the largest of the maxima the GATE_UP kernel stored: the row's, without a pass over it
            for k0 in range(0, N_SLOTS, AMAX_K):
                offs = k0 + tl.arange(0, AMAX_K)
                amax1 = tl.maximum(amax1, tl.load(slot_ptr + offs, mask=offs < N_SLOTS, other=0.0))
        s0 = tl.maximum(tl.max(amax1, axis=0) / FP8_MAX, MIN_SCALE)
        s = tl.where(offs_m == 0, s0, 1.0)
        if PARTS:
            tl.store(xs_ptr + offs_m, s, mask=(offs_m == 0) & (offs_m * 0 + pid_n + pid_k == 0))
    elif X_MODE == 1:
        s = tl.load(xs_ptr + offs_m * 0)
    else:
        s = tl.load(xs_ptr + offs_m, mask=m_mask, other=1.0)
    if DOT:  # float8 values are exact in float16: tensor cores multiply them exactly, summing in float32
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:  # one row: FMAs per K position, reduced across K once at the end
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_begin, k_begin + K_SPLIT, BLOCK_K):
        offs_k = k0 + offs_kb
        k_mask = offs_k < K
        if X_MODE >= 3:
            x0 = _one_row(x_ptr, offs_k, k_mask, K, SILU_MUL)
            q0 = tl.clamp(tl.math.div_rn(x0, s0), -FP8_MAX, FP8_MAX).to(tl.float8e4nv).to(tl.float16)
            xq = tl.where(offs_m[:, None] == 0, q0[None, :], tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float16))
        elif X_MODE == 2:
            xq = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        else:
            # as quantize_rows: a correctly rounded division, clamped, rounded to float8
            x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            xq = tl.clamp(tl.math.div_rn(x.to(tl.float32), s[:, None]), -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0
        )
        if DOT:
            acc = tl.dot(xq.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
        else:
            acc += w.to(tl.float32) * xq.to(tl.float32)
    if PDL:  # the next kernel may launch now; it waits for this one's stores before it reads them
        gdc_launch_dependents()
    if DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=1)[None, :]
    y_ptrs = y_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if not PARTS:  # the reference's order: (q_x . q_w) * s_x * s_w
        ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
        res = (out * s[:, None] * ws[None, :]).to(y_ptr.dtype.element_ty)
        if GATE_UP:  # h = silu(gate) * up from the rounded products, and this program's largest |h|
            g, u = tl.split(tl.reshape(res.to(tl.float32), [BLOCK_M, BLOCK_N // 2, 2]))
            h = silu_mul(g, u, y_ptr.dtype.element_ty)
            cols_h = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            h_mask = m_mask[:, None] & (cols_h < N // 2)[None, :]
            tl.store(y_ptr + offs_m[:, None] * (N // 2) + cols_h[None, :], h.to(y_ptr.dtype.element_ty), mask=h_mask)
            tl.store(slot_ptr + pid_n, tl.max(tl.max(tl.where(h_mask, tl.abs(h), 0.0), axis=1), axis=0))
        else:
            tl.store(y_ptrs, res, mask=y_mask)
    else:  # a K split's float32 sum, scaled once the splits are added
        tl.store(y_ptrs, out, mask=y_mask)
        if FUSED_SUM:
            # As kernels/awq.py's GEMV: the split that finds the others done adds the parts in split
            # order and scales them (_sum_parts_kernel's arithmetic), then sets the count back to 0.
            tl.debug_barrier()
            block = tl.program_id(2) * tl.num_programs(0) + pid_n
            done = tl.atomic_add(count_ptr + block, 1, sem="acq_rel", scope="gpu")
            if done == SPLITS - 1:
                total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for i in tl.static_range(SPLITS):
                    part = y_ptr + (i * M + offs_m[:, None]) * N + offs_n[None, :]
                    total += tl.load(part, mask=y_mask, other=0.0, cache_modifier=".cg")
                ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
                res = total * s[:, None] * ws[None, :]
                tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], res.to(out_ptr.dtype.element_ty), mask=y_mask)
                tl.atomic_xchg(count_ptr + block, 0, sem="relaxed", scope="gpu")


@triton.jit
def _sum_parts_kernel(part_ptr, xs_ptr, ws_ptr, y_ptr, M, N, STRIDE_XS, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """y = (the K splits' float32 sums [SPLITS, M, N] added in split order) * s_x * s_w, in y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(SPLITS):
        acc += tl.load(part_ptr + i * M * N + offs, mask=mask, other=0.0)
    sx = tl.load(xs_ptr + (offs // N) * STRIDE_XS, mask=mask, other=0.0)
    ws = tl.load(ws_ptr + offs % N, mask=mask, other=0.0)
    tl.store(y_ptr + offs, (acc * sx * ws).to(y_ptr.dtype.element_ty), mask=mask)


class Skinny(NamedTuple):
    block_n: int
    block_k: int
    warps: int
    splits: int
    dot: bool


# (N, K, one row) -> the config measured fastest on an H100 for Llama-3.1-8B's qkv, o, gate_up and down;
# other shapes take the default. False: the tensor-core configs fp8_linear runs at every row count up to
# SKINNY_ROWS, swept at one row as it runs there (experiments/fp8_table_bench.py, twelfth wave); True:
# the one-row FMA path (quant_kernels.py --sweep), which fp8_linear does not take.
SKINNY_TABLE: dict[tuple[int, int, bool], Skinny] = {
    (6144, 4096, False): Skinny(64, 128, 4, 4, True),
    (4096, 4096, False): Skinny(128, 128, 4, 8, True),
    (28672, 4096, False): Skinny(64, 128, 4, 1, True),
    (4096, 14336, False): Skinny(64, 256, 4, 4, True),
    (6144, 4096, True): Skinny(8, 512, 4, 1, False),
    (4096, 4096, True): Skinny(16, 1024, 8, 1, False),
    (28672, 4096, True): Skinny(16, 256, 4, 1, False),
    (4096, 14336, True): Skinny(8, 1024, 4, 1, False),
}


def skinny_config(m: int, n: int, k: int, device: torch.device) -> Skinny:
    """The table's entry, else: column blocks of a few rows each (whole rows are contiguous in K), K
    split only when that leaves fewer than two programs per SM."""
    hit = SKINNY_TABLE.get((n, k, m == 1))
    if hit is not None:
        return hit
    block_n, block_k = (16, 512) if m == 1 else (64, 128)
    programs = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    splits = max(1, min(k_tiles, triton.cdiv(2 * num_sms(device), programs)))
    return Skinny(block_n, block_k, 4 if m == 1 else 8, splits, m > 1)


def split_counts(n: int, device) -> torch.Tensor:
    """The counters fp8_skinny's K splits use to let the last one add the parts (one per block of
    rows and columns, up to SKINNY_ROWS rows in DOT_ROWS tiles, BLOCK_N 8 at the least), zero between
    calls. A linear keeps its own."""
    return torch.zeros(triton.cdiv(SKINNY_ROWS, DOT_ROWS) * triton.cdiv(n, 8), dtype=torch.int32, device=device)


def fp8_skinny(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    act_scale: torch.Tensor | None,
    cfg: Skinny | None = None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    counts: torch.Tensor | None = None,
    one_row: bool = False,
    silu_mul: bool = False,
    gate_up: bool = False,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp8_linear for few rows: x [M, K] (M <= 64) in bf16/fp16 -> [M, N] in x's dtype. x may also be
    float8 already, with its per-row x_scale [M, 1] (quantize_rows' output; the result in out_dtype).
    counts (split_counts): K splits are added by the last one, else by a kernel of their own.
    one_row: x is one bf16/fp16 row, quantized in the kernel as quantize_rows would (tensor-core tiles).
    silu_mul (one_row only): x is [1, 2K] = [gate | up] and the row multiplied is silu(gate) * up.
    gate_up (one_row, no K splits): w is [gate; up] (N = 2I); the result is h = silu(gate) * up [1, I],
    and each program's largest |h| goes to slots [cdiv(I, block_n / 2)]. slots without gate_up (one_row):
    those maxima, which give x's scale without a pass over x (x is the gate_up kernel's h)."""
    (m, width), (n, k) = x.shape, w.shape
    pdl = pdl_ok(x.device)
    if width != (2 if silu_mul else 1) * k or (silu_mul and not one_row):
        raise ValueError(f"x {list(x.shape)} for a weight {list(w.shape)} (silu_mul={silu_mul}, one_row={one_row})")
    cfg = cfg or skinny_config(m, n, k, x.device)
    dot = cfg.dot or m > 1  # the FMA path holds one row
    block_m = DOT_ROWS if dot else 1
    k_split = triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.splits) * cfg.block_k
    parts = cfg.splits > 1
    n_out, block_out = (n // 2, cfg.block_n // 2) if gate_up else (n, cfg.block_n)
    grid = (triton.cdiv(n_out, block_out), cfg.splits, triton.cdiv(m, block_m))
    fused = parts and counts is not None
    if fused and counts.numel() < grid[0] * grid[2]:
        raise ValueError(f"{counts.numel()} split counters for {grid[0] * grid[2]} blocks")
    if (gate_up or slots is not None) and (not one_row or silu_mul or slots is None or slots.dtype != torch.float32):
        raise ValueError("gate_up and slots take one row, without silu_mul, and float32 slots")
    if gate_up and (parts or n % 2 or cfg.block_n % 2 or slots.numel() != grid[0]):
        raise ValueError(f"gate_up: {cfg} splits K or has an odd width, or {slots.numel()} slots for {grid[0]}")
    if one_row:
        if m != 1 or x.dtype == FP8 or act_scale is not None or not dot:
            raise ValueError("one_row takes one half-precision row, no static scale, and a tensor-core config")
        mode = X_ONE_ROW_SLOTS if slots is not None and not gate_up else X_ONE_ROW
        xs, out_dtype = torch.empty(1, dtype=torch.float32, device=x.device), x.dtype
    elif x.dtype == FP8:
        mode, xs = X_FP8, x_scale.float().reshape(m).contiguous()
    elif act_scale is None:
        mode, xs, out_dtype = X_DYNAMIC, torch.empty(m, dtype=torch.float32, device=x.device), x.dtype
    else:
        mode, xs, out_dtype = X_STATIC, act_scale.float().reshape(1), x.dtype
    shape, dtype = ((cfg.splits, m, n), torch.float32) if parts else ((m, n_out), out_dtype)
    y = torch.empty(shape, dtype=dtype, device=x.device)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device) if parts else y
    n_slots = 0 if slots is None else slots.numel()
    amax_k = min(AMAX_K, triton.next_power_of_2(n_slots if mode == X_ONE_ROW_SLOTS else k))
    _skinny_kernel[grid](
        x, w, w_scale, xs, y, out, counts if fused else y, y if slots is None else slots, m, n, k, k_split,
        n_slots, x.stride(0), w.stride(0), X_MODE=mode, PARTS=parts, SPLITS=cfg.splits, FUSED_SUM=fused,
        DOT=dot, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, AMAX_K=amax_k, FP8_MAX=FP8_MAX,
        MIN_SCALE=MIN_SCALE, SILU_MUL=silu_mul, GATE_UP=gate_up, num_warps=cfg.warps,
        **({"PDL": True, "launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    if parts and not fused:
        block = 1024
        _sum_parts_kernel[(triton.cdiv(m * n, block),)](
            y, xs, w_scale, out, m, n, 0 if mode == X_STATIC else 1, SPLITS=cfg.splits, BLOCK=block
        )
    return out


def fp8_mlp_one_row(
    x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, counts=None
) -> torch.Tensor | None:
    """down(silu(gate) * up) of one row x [1, H] (gate_up w1 [2I, H] and down w2 [N, I], float8 with their
    per-channel scales, no static activation scale) in two kernels, with the bits of gate_up, the
    activation kernel and down run one by one: gate_up's epilogue computes h and each program's largest
    |h|, from which down takes h's scale instead of a pass over [gate | up] before its first weight tile.
    None where gate_up's config splits K (its epilogue needs whole sums): the caller runs them apart."""
    cfg = skinny_config(DOT_ROWS, w1.shape[0], w1.shape[1], x.device)
    if x.shape[0] != 1 or cfg.splits > 1 or cfg.block_n % 2 or w1.shape[0] % 2 or x.dtype == FP8:
        return None
    x = x if x.stride(-1) == 1 else x.contiguous()
    slots = torch.empty(triton.cdiv(w1.shape[0] // 2, cfg.block_n // 2), dtype=torch.float32, device=x.device)
    h = fp8_skinny(x, w1, s1, None, cfg=cfg, one_row=True, gate_up=True, slots=slots)
    cfg2 = skinny_config(DOT_ROWS, w2.shape[0], w2.shape[1], x.device)
    return fp8_skinny(h, w2, s2, None, cfg=cfg2, counts=counts, one_row=True, slots=slots)


@functools.cache
def _one(device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32, device=device)


def fp8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    act_scale: torch.Tensor | None,
    kernel: str,
    counts: torch.Tensor | None = None,
    silu_mul: bool = False,
) -> torch.Tensor:
    """x [M, K] @ (w [N, K] float8 * w_scale [N])^T -> [M, N] in x's dtype. kernel: "rowwise" (SM90+:
    both scales in _scaled_mm's epilogue) or "tensorwise" (SM89: unit scales, both applied after).
    counts (split_counts): the skinny kernel's K splits added by the last one. silu_mul: x is one row
    [1, 2K] = [gate | up], without a static scale, and the product is silu(gate) * up's."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    if x.shape[0] == 1 and act_scale is None:  # batch-1 decode: the row quantized in the kernel
        cfg = skinny_config(DOT_ROWS, w.shape[0], w.shape[1], x.device)
        return fp8_skinny(x, w, w_scale, None, cfg=cfg, counts=counts, one_row=True, silu_mul=silu_mul)
    if silu_mul:
        raise ValueError(f"silu_mul takes one row without a static scale; got {x.shape[0]} rows")
    if act_scale is None:
        q, s = quantize_rows(x)
    else:  # a checkpoint's static scale, one for every token
        q = (x.float() / act_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        s = act_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    if x.shape[0] <= SKINNY_ROWS:  # one config for every row count: the same bits for a row at any M
        cfg = skinny_config(DOT_ROWS, w.shape[0], w.shape[1], x.device)
        return fp8_skinny(q, w, w_scale, None, cfg=cfg, x_scale=s, out_dtype=x.dtype, counts=counts)
    if kernel == "rowwise":  # row-wise scaling takes a bf16 output only
        y = torch._scaled_mm(q, w.t(), scale_a=s, scale_b=w_scale.view(1, -1), out_dtype=torch.bfloat16)
    else:
        one = _one(x.device)
        y = torch._scaled_mm(q, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32) * s * w_scale
    return y if y.dtype == x.dtype else y.to(x.dtype)
