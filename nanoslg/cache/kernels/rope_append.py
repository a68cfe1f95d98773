"""A decode step's rotary embedding and paged-KV append in one kernel (the FlashInfer backend's
`cache.fused_rope=auto`).

FlashInfer runs them as two launches a layer: rope in place on q and k, then `append_paged_kv_cache`.
At a few sequences a step both are short launches whose time is mostly their start-up. This kernel
does both: q is rotated into a contiguous buffer (the attention kernel reads it next, and a strided q
would otherwise be copied), k is rotated and written, with v, straight into its page slot; q and k
themselves are left as they were.

- Rotary: neox style over the whole head, with the model's [max_pos, D] float32 cache (cos half |
  sin half), computed as FlashInfer's kernel writes it: x * cos + (-x_other | x_other) * sin in
  float32, rounded to the model's dtype.
- An FP8 pool (`cache.kv_dtype=fp8_e4m3`): k, rotated and rounded to the model's dtype, and v are
  stored as kv_quant.to_cache does it: divided by the layer's scale, saturated, rounded to float8.
- Slot: FlashInfer's, for token t of sequence b = batch_indices[t] at KV position p = positions[t]:
  page kv_indices[kv_indptr[b] + p // page_size], row p % page_size, in an NHD pool
  [pages, 2 (K, V), page_size, kv_heads, D].

One program per (token, head): query heads first, then KV heads. On SM90 it launches as a programmatic
dependent (core/pdl.py): between the qkv projection and FlashInfer's attention, which launch so too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoslg.core.pdl import gdc_launch_dependents, gdc_wait, pdl_ok


@triton.jit
def _rope_append_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, cache_ptr, bidx_ptr, kvpos_ptr, indices_ptr, indptr_ptr, out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_page, stride_kv, stride_row, stride_head, k_scale, v_scale,
    HQ: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    if PDL:  # launched before the previous kernel ended: read nothing until it has
        gdc_wait()
        gdc_launch_dependents()  # the attention kernel next waits for this one's stores itself
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cs_ptr + pos * (2 * HALF) + d)
    sin = tl.load(cs_ptr + pos * (2 * HALF) + HALF + d)
    dtype = q_ptr.dtype.element_ty
    # Each branch has its own names and stores: compiled Triton wants a variable to keep one type
    # across an if, and an FP8 pool's pointer and values are not q's.
    if h < HQ:
        q1, q2 = _rotate(q_ptr + t.to(tl.int64) * stride_qt + h * stride_qh, d, cos, sin, HALF, dtype)
        q_dst = out_ptr + (t.to(tl.int64) * HQ + h) * (2 * HALF)
        tl.store(q_dst + d, q1)
        tl.store(q_dst + HALF + d, q2)
    else:
        kh = h - HQ
        k1, k2 = _rotate(k_ptr + t.to(tl.int64) * stride_kt + kh * stride_kh, d, cos, sin, HALF, dtype)
        b = tl.load(bidx_ptr + t)
        p = tl.load(kvpos_ptr + t)
        page = tl.load(indices_ptr + tl.load(indptr_ptr + b) + p // PAGE).to(tl.int64)
        slot = cache_ptr + page * stride_page + (p % PAGE) * stride_row + kh * stride_head
        v_src = v_ptr + t.to(tl.int64) * stride_vt + kh * stride_vh
        v1, v2 = tl.load(v_src + d), tl.load(v_src + HALF + d)
        if FP8:
            k1, k2 = _to_fp8(k1, k_scale, cache_ptr), _to_fp8(k2, k_scale, cache_ptr)
            v1, v2 = _to_fp8(v1, v_scale, cache_ptr), _to_fp8(v2, v_scale, cache_ptr)
        tl.store(slot + d, k1)
        tl.store(slot + HALF + d, k2)
        tl.store(slot + stride_kv + d, v1)
        tl.store(slot + stride_kv + HALF + d, v2)


@triton.jit
def _rotate(src, d, cos, sin, HALF: tl.constexpr, dtype: tl.constexpr):
    # neox rotary of one head, in float32, rounded to the model's dtype (FlashInfer's arithmetic)
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + HALF + d).to(tl.float32)
    return (x1 * cos + (-x2) * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@triton.jit
def _to_fp8(x, scale, cache_ptr):
    # kv_quant.to_cache: divided by the scale (exact at 1.0), saturated, rounded to the pool's float8
    y = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -448.0, 448.0)
    return y.to(cache_ptr.dtype.element_ty)


def rope_append(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    cache: torch.Tensor,
    batch_indices: torch.Tensor,
    kv_positions: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_indptr: torch.Tensor,
    out: torch.Tensor,
    scales: tuple[float, float] = (1.0, 1.0),
) -> None:
    """q [T, Hq, D] rotated into out (contiguous, q's shape); k [T, Hk, D] rotated and v [T, Hk, D] as
    is, both written into the layer's pool `cache` [pages, 2, page_size, Hk, D] (a float8 pool: divided
    by scales = (k_scale, v_scale) and rounded). q, k and v may be strided views (of the fused qkv
    output) with a contiguous last dimension."""
    t, hq, d = q.shape
    hk = k.shape[1]
    if any(x.stride(-1) != 1 for x in (q, k, v, cache)) or not out.is_contiguous() or out.shape != q.shape:
        raise ValueError("rope_append takes q, k, v and the pool with a contiguous last dimension, out as q")
    if t == 0:
        return
    _rope_append_kernel[(t, hq + hk)](
        q, k, v, positions, cos_sin, cache, batch_indices, kv_positions, kv_indices, kv_indptr, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3), float(scales[0]), float(scales[1]),
        HQ=hq, HALF=d // 2, PAGE=cache.shape[2], FP8=cache.dtype == torch.float8_e4m3fn, num_warps=1,
        **({"PDL": True, "launch_pdl": True} if pdl_ok(q.device) else {}),
    )  # fmt: skip
