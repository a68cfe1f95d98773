"""Paged decode attention in Triton, for the sdpa backend on a GPU without FlashInfer.

The gather path (sdpa_decode.py) copies each decode row's keys out of the page pool before attending,
so every step moves the whole KV cache three times. This kernel reads keys and values where they lie,
through each row's page table, once. One program takes one row, one KV head and one split of the
row's keys; the GQA group's query heads ride together (padded to BLOCK_H rows, since tl.dot needs 16).
With more than one split a second kernel merges the splits by their log-sum-exp. The number of splits
depends on the batch size alone (not on the lengths), so a CUDA graph captured for a batch size
replays for any lengths: each program works out its own range from the row's length.

Imported only when the sdpa backend picks it (sdpa_paged.triton_status), so CPU installs never
import Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per inner iteration


@triton.jit
def _split_kernel(
    Q, K, V, Table, Lens, Rows, Out, MidO, MidLse,
    scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.load(Lens + b).to(tl.int32)
    t = tl.load(Rows + b)  # the row's token in the step
    per = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK) * BLOCK
    lo = split * per
    hi = tl.minimum(lo + per, n)
    heads = tl.arange(0, BLOCK_H)
    in_group = heads < GROUP
    qh = kvh * GROUP + heads
    d = tl.arange(0, D)
    q = tl.load(Q + t * stride_qt + qh[:, None] * stride_qh + d[None, :], mask=in_group[:, None], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for start in range(lo, hi, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        ok = pos < hi
        page = tl.load(Table + b * stride_tb + pos // PAGE, mask=ok, other=0).to(tl.int64)
        slot = page * PAGE + pos % PAGE
        k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m, l_sum, acc = softmax_tile(s, v, m, l_sum, acc, IEEE)
    empty = l_sum == 0.0  # a split past the row's end (or a padding row of length 0)
    o = acc / tl.where(empty, 1.0, l_sum)[:, None]
    if SPLITS == 1:
        ptr = Out + t * stride_ot + qh[:, None] * stride_oh + d[None, :]
        tl.store(ptr, o.to(Out.dtype.element_ty), mask=in_group[:, None])
    else:
        lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l_sum)))
        base = (b * tl.num_programs(1) * GROUP + qh) * SPLITS + split  # by batch row, not token
        tl.store(MidO + base[:, None] * D + d[None, :], o, mask=in_group[:, None])
        tl.store(MidLse + base, lse, mask=in_group)


@triton.jit
def softmax_tile(s, v, m, l_sum, acc, IEEE: tl.constexpr):
    """One tile of the online softmax: scores s [H, BLOCK] (-inf where masked) and values v [BLOCK, D]
    into the running max m, sum l_sum and output acc. A tile with no key leaves them as they were."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp(-inf - 0) = 0, not NaN
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l_sum = l_sum * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_sum, acc


@triton.jit
def _merge_kernel(MidO, MidLse, Rows, Out, stride_qt, stride_qh, D: tl.constexpr, SPLITS: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    t = tl.load(Rows + b)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    base = (b * tl.num_programs(1) + h) * SPLITS
    lse = tl.load(MidLse + base + s)
    top = tl.max(lse, 0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - tl.where(top == float("-inf"), 0.0, top)))
    o = tl.load(MidO + (base + s)[:, None] * D + d[None, :])
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + t * stride_qt + h * stride_qh + d, out.to(Out.dtype.element_ty))


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    lens: torch.Tensor,
    rows: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    page_size: int,
    splits: int,
) -> None:
    """Writes out[rows[b]] = attention of q[rows[b]] over the first lens[b] keys of row b's pages.

    q, out: [T, Hq, D], each with its own strides (q is often a view of the fused qkv output, out a
    new tensor); k_pool, v_pool: [slots, Hkv, D] (slot = page * page_size + offset);
    table: [B, max_pages] page ids; lens, rows: [B] (integer tensors; the backend passes int64). A row
    of length 0 writes zeros.
    """
    batch, (hq, dim), hkv = table.shape[0], q.shape[1:], k_pool.shape[1]
    if batch == 0:
        return
    group = hq // hkv
    grid = (batch, hkv, splits)
    mid_o = mid_lse = out  # unused when splits == 1
    if splits > 1:
        mid_o = torch.empty(batch * hq * splits * dim, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(batch * hq * splits, dtype=torch.float32, device=q.device)
    _split_kernel[grid](
        q, k_pool, v_pool, table, lens, rows, out, mid_o, mid_lse,
        scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), table.stride(0),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), D=dim, PAGE=page_size, BLOCK=BLOCK_N,
        SPLITS=splits, IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2,
    )  # fmt: skip
    if splits > 1:
        _merge_kernel[(batch, hq)](mid_o, mid_lse, rows, out, out.stride(0), out.stride(1), D=dim, SPLITS=splits)
