"""A decode step's rotary, KV append and attention in one kernel, for steps of a few sequences (the
FlashInfer backend's `cache.flashinfer_decode=fused`; decode_choice.py).

At batch 1 a layer's attention is three short launches (rotary + append, FlashInfer's decode, its
split-KV merge), each mostly start-up and memory latency: the keys of a few hundred tokens are about
a megabyte. This kernel does the three in one launch, and as a programmatic dependent on SM90 it loads
its first tile of cached keys and values before waiting for the qkv projection that writes q, k and v
(those keys were written by earlier steps, which have ended by then).

One program per (row, KV head, split); the GQA group's query heads ride together (padded to BLOCK_H
rows for tl.dot). A row's n keys (the cached n - 1 and the new one) go to SPLITS splits of whole
BLOCK-key tiles, so the splits a row uses depend on its length alone and a CUDA graph replays for any
length. Each program:
1. loads its first tile of cached keys (positions below n - 1) and waits for the projection;
2. rotates its group's q (neox, float32, rounded to the model's dtype: FlashInfer's arithmetic and
   kernels/rope_append.py's), and the split holding position n - 1 rotates k and stores it with v in
   the row's page slot;
3. runs the online softmax over its tiles, the new key last (from registers);
4. with one split, stores the output; else stores its partial output and log-sum-exp and counts
   itself done on the (row, KV head)'s counter, and the last to finish merges every split in split
   order (the same bits whichever finished last) and sets the counter back to zero for the next step.

Pool: the FlashInfer backend's NHD layer [pages, 2 (K, V), page_size, kv_heads, D], in the model's
dtype (an FP8 pool takes XQA or FlashInfer's kernels). Imported only on a GPU with Triton (and by the
interpreter tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoslg.cache.kernels.paged_decode import softmax_tile
from nanoslg.cache.kernels.rope_append import _rotate
from nanoslg.core.pdl import gdc_launch_dependents, gdc_wait, pdl_ok

SPLITS = 16  # splits per (row, KV head): about one wave of programs at batch 1 on Llama-8B's 8 KV heads
BLOCK = 64  # keys per tile


@triton.jit
def _fused_decode_kernel(
    Q, Kn, Vn, Pos, CosSin, Cache, KvPos, Indices, Indptr, Out, MidO, MidLse, Count,
    scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_page, stride_kv, stride_row, stride_head,
    HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
    PAGE: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # Host-written before the step (page table, KV position): readable before the wait.
    n = tl.load(KvPos + b).to(tl.int32) + 1
    per = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK) * BLOCK
    lo = split * per
    if lo < n:
        hi = tl.minimum(lo + per, n)
        cached = tl.minimum(hi, n - 1)  # keys of this split already in the pool
        first = tl.load(Indptr + b)
        d = tl.arange(0, HALF)
        dv = tl.arange(0, 2 * HALF)
        k1, k2, v, ok = _tile(Cache, Indices, first, lo, cached, kvh, d, dv,
                              stride_page, stride_kv, stride_row, stride_head, HALF, PAGE, BLOCK)  # fmt: skip
        if PDL:  # the projection that writes q, k and v may still run: read none of them before this
            gdc_wait()
            gdc_launch_dependents()  # the o projection next waits for this kernel's stores itself
        heads = tl.arange(0, BLOCK_H)
        in_group = heads < GROUP
        qh = kvh * GROUP + tl.where(in_group, heads, 0)  # padding rows repeat the group's first head
        dtype = Q.dtype.element_ty
        pos = tl.load(Pos + b).to(tl.int64)
        cos = tl.load(CosSin + pos * (2 * HALF) + d)
        sin = tl.load(CosSin + pos * (2 * HALF) + HALF + d)
        q_src = Q + b.to(tl.int64) * stride_qt + qh[:, None] * stride_qh
        q1, q2 = _rotate(q_src, d[None, :], cos, sin, HALF, dtype)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, 2 * HALF], tl.float32)
        m, l_sum, acc = _attend(q1, q2, k1, k2, v, ok, m, l_sum, acc, scale, IEEE)
        for start in range(lo + BLOCK, cached, BLOCK):
            k1, k2, v, ok = _tile(Cache, Indices, first, start, cached, kvh, d, dv,
                                  stride_page, stride_kv, stride_row, stride_head, HALF, PAGE, BLOCK)  # fmt: skip
            m, l_sum, acc = _attend(q1, q2, k1, k2, v, ok, m, l_sum, acc, scale, IEEE)
        if hi == n:  # this split holds the new key: rotate it, store it with v, attend to it
            kn1, kn2 = _rotate(Kn + b.to(tl.int64) * stride_kt + kvh * stride_kh, d, cos, sin, HALF, dtype)
            vn = tl.load(Vn + b.to(tl.int64) * stride_vt + kvh * stride_vh + dv)
            p_new = n - 1
            page = tl.load(Indices + first + p_new // PAGE).to(tl.int64)
            slot = Cache + page * stride_page + (p_new % PAGE) * stride_row + kvh * stride_head
            tl.store(slot + d, kn1)
            tl.store(slot + HALF + d, kn2)
            tl.store(slot + stride_kv + dv, vn)
            s = tl.sum(q1.to(tl.float32) * kn1.to(tl.float32)[None, :], 1)
            s = (s + tl.sum(q2.to(tl.float32) * kn2.to(tl.float32)[None, :], 1)) * scale
            m_new = tl.maximum(m, s)
            p = tl.exp(s - m_new)
            alpha = tl.exp(m - m_new)
            l_sum = l_sum * alpha + p
            p = p.to(dtype).to(tl.float32)  # rounded as a tile's weights are for its dot with v
            acc = acc * alpha[:, None] + p[:, None] * vn.to(tl.float32)[None, :]
            m = m_new
        o_rows = (b * HQ + qh).to(tl.int64)
        active = tl.cdiv(n, per)
        if active == 1:
            out = acc / l_sum[:, None]
            tl.store(Out + o_rows[:, None] * (2 * HALF) + dv[None, :], out.to(dtype), mask=in_group[:, None])
        else:
            mid = o_rows * SPLITS + split
            tl.store(MidO + mid[:, None] * (2 * HALF) + dv[None, :], acc / l_sum[:, None], mask=in_group[:, None])
            tl.store(MidLse + mid, m + tl.log(l_sum), mask=in_group)
            tl.debug_barrier()  # every thread's partial stored before the count releases them
            done = tl.atomic_add(Count + b * HKV + kvh, 1, sem="acq_rel", scope="gpu")
            if done == active - 1:  # the last split of this (row, KV head) to finish merges them all
                tl.atomic_xchg(Count + b * HKV + kvh, 0, sem="relaxed", scope="gpu")
                _merge(MidO, MidLse, Out, o_rows, in_group, dv, active, dtype, SPLITS, BLOCK_H, HALF)


@triton.jit
def _tile(Cache, Indices, first, start, end, kvh, d, dv,
          stride_page, stride_kv, stride_row, stride_head, HALF: tl.constexpr, PAGE: tl.constexpr,
          BLOCK: tl.constexpr):  # fmt: skip
    """The cached keys (both halves) and values at positions [start, start + BLOCK) below end."""
    pos = start + tl.arange(0, BLOCK)
    ok = pos < end
    page = tl.load(Indices + first + pos // PAGE, mask=ok, other=0).to(tl.int64)
    row = Cache + page * stride_page + (pos % PAGE) * stride_row + kvh * stride_head
    k1 = tl.load(row[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    k2 = tl.load(row[:, None] + HALF + d[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(row[:, None] + stride_kv + dv[None, :], mask=ok[:, None], other=0.0)
    return k1, k2, v, ok


@triton.jit
def _attend(q1, q2, k1, k2, v, ok, m, l_sum, acc, scale, IEEE: tl.constexpr):
    """One tile of the online softmax: scores over both rotary halves, running max, sum and output."""
    if IEEE:
        s = tl.dot(q1, tl.trans(k1), input_precision="ieee") + tl.dot(q2, tl.trans(k2), input_precision="ieee")
    else:
        s = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
    return softmax_tile(tl.where(ok[None, :], s * scale, float("-inf")), v, m, l_sum, acc, IEEE)


@triton.jit
def _merge(MidO, MidLse, Out, o_rows, in_group, dv, active, dtype: tl.constexpr, SPLITS: tl.constexpr,
           BLOCK_H: tl.constexpr, HALF: tl.constexpr):  # fmt: skip
    """Out = the splits' outputs weighted by exp(lse - max lse), summed in split order."""
    s = tl.arange(0, SPLITS)
    mask = in_group[:, None] & (s < active)[None, :]
    # .cg: from L2, not this SM's L1 (not coherent with the SMs that stored the other splits)
    lse = tl.load(MidLse + o_rows[:, None] * SPLITS + s[None, :], mask=mask, other=float("-inf"), cache_modifier=".cg")
    top = tl.max(lse, 1)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK_H], tl.float32)
    out = tl.zeros([BLOCK_H, 2 * HALF], tl.float32)
    for j in range(0, active):
        lse_j = tl.load(MidLse + o_rows * SPLITS + j, mask=in_group, other=float("-inf"), cache_modifier=".cg")
        w = tl.exp(lse_j - top)
        o_j = tl.load(MidO + (o_rows * SPLITS + j)[:, None] * (2 * HALF) + dv[None, :], mask=in_group[:, None],
                      other=0.0, cache_modifier=".cg")  # fmt: skip
        total += w
        out += w[:, None] * o_j
    out = out / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(Out + o_rows[:, None] * (2 * HALF) + dv[None, :], out.to(dtype), mask=in_group[:, None])


class FusedDecode:
    """The scratch of one backend's fused decode steps of up to `rows` rows: the splits' partial
    outputs and log-sum-exps, and the per (row, KV head) counters (zero between launches)."""

    def __init__(self, rows: int, num_qo_heads: int, num_kv_heads: int, head_dim: int, device):
        self.rows = rows
        self.mid_o = torch.empty(rows * num_qo_heads * SPLITS * head_dim, dtype=torch.float32, device=device)
        self.mid_lse = torch.empty(rows * num_qo_heads * SPLITS, dtype=torch.float32, device=device)
        self.count = torch.zeros(rows * num_kv_heads, dtype=torch.int32, device=device)

    def run(self, q, k, v, positions, cos_sin, cache, kv_positions, kv_indices, kv_indptr, scale: float):
        """Rotates q and k, appends k and v to the pool `cache` and returns the attention output [T, Hq, D]
        of each row t (one token per row) over its kv_positions[t] + 1 keys. q, k, v: [T, H, D] views
        with a contiguous last dimension (of the fused qkv output); positions: rotary positions [T];
        kv_indptr [T + 1] / kv_indices: each row's pages (CSR), on the device."""
        t, hq, d = q.shape
        hkv = k.shape[1]
        if t > self.rows:
            raise ValueError(f"the fused decode scratch holds {self.rows} rows, the step has {t}")
        if any(x.stride(-1) != 1 for x in (q, k, v, cache)) or cache.dtype != q.dtype:
            raise ValueError("fused decode takes q, k, v and a pool in q's dtype with a contiguous last dimension")
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if t == 0:
            return out
        group = hq // hkv
        _fused_decode_kernel[(t, hkv, SPLITS)](
            q, k, v, positions, cos_sin, cache, kv_positions, kv_indices, kv_indptr, out,
            self.mid_o, self.mid_lse, self.count,
            scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
            HQ=hq, HKV=hkv, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HALF=d // 2,
            PAGE=cache.shape[2], BLOCK=BLOCK, SPLITS=SPLITS, IEEE=q.dtype == torch.float32, num_warps=4,
            num_stages=2, **({"PDL": True, "launch_pdl": True} if pdl_ok(q.device) else {}),
        )  # fmt: skip
        return out
