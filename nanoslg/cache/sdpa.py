"""The SDPA backend: a contiguous KV slab per running sequence and torch's scaled_dot_product_attention.

It runs everywhere torch runs (the CPU path of CI, and GPUs without FlashInfer). Slabs grow by
a quarter at a time; the rank-0 TokenBudgetManager keeps the sum of reservations within the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoslg.cache.backend import CacheBackend, CacheContext, KVSpec, positions_of
from nanoslg.cache.kv_quant import from_cache, to_cache
from nanoslg.core.plan import StepPlan
from nanoslg.core.registry import CACHE_BACKENDS


def causal_mask(start: int, n: int, device: torch.device) -> torch.Tensor:
    """Lower-right causal mask for n queries at positions start.. over start+n keys."""
    q = torch.arange(start, start + n, device=device)[:, None]
    k = torch.arange(start + n, device=device)[None, :]
    return k <= q


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q: [n, Hq, D] at positions start..start+n-1; k, v: [start+n, Hkv, D]. Returns [n, Hq, D]."""
    n = q.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if n == 1:  # one query sees every key: no mask needed
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=True)
    elif start == 0:  # plain prefill: the upper-left causal mask is the right one
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:  # a chunk over existing KV
        mask = causal_mask(start, n, q.device)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


@dataclass
class _Slot:
    slab: torch.Tensor  # [2, layers, capacity, Hkv, D]
    start: int
    n: int
    offset: int  # first row of this sequence in the step's flattened tokens


class SdpaContext(CacheContext):
    def __init__(self, slots: list[_Slot], positions: torch.Tensor, scale: float, spec: KVSpec):
        self.slots = slots
        self.positions = positions
        self.scale = scale
        self.spec = spec

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        ks, vs = self.spec.scales(layer)
        pool = self.spec.cache_dtype
        k, v = to_cache(k, ks, pool), to_cache(v, vs, pool)  # an FP8 pool stores x / scale (kv_quant.py)
        for s in self.slots:
            rows = slice(s.offset, s.offset + s.n)
            end = s.start + s.n
            s.slab[0, layer, s.start : end] = k[rows]
            s.slab[1, layer, s.start : end] = v[rows]
            kc, vc = from_cache(s.slab[0, layer, :end], ks, q.dtype), from_cache(s.slab[1, layer, :end], vs, q.dtype)
            out[rows] = attend_one(q[rows], kc, vc, s.start, self.scale)
        return out


@CACHE_BACKENDS.register("sdpa")
class SdpaBackend(CacheBackend):
    name = "sdpa"

    def __init__(self, spec: KVSpec, page_size: int):
        super().__init__(spec, page_size)
        self.slabs: dict[int, torch.Tensor] = {}

    def allocate(self, num_pages: int) -> None:
        self.capacity_tokens = num_pages * self.page_size  # slabs are allocated lazily per sequence

    def _slab(self, seq_id: int, needed: int) -> torch.Tensor:
        slab = self.slabs.get(seq_id)
        cap = 0 if slab is None else slab.shape[2]
        if needed <= cap:
            return slab
        # Grow by a quarter (at least 256 tokens): few copies, bounded overshoot of the budget.
        new_cap = max(needed, min(cap + max(256, cap // 4), self.capacity_tokens))
        new_cap = -(-new_cap // self.page_size) * self.page_size
        s = self.spec
        new = torch.empty(2, s.num_layers, new_cap, s.num_kv_heads, s.head_dim, dtype=s.cache_dtype, device=s.device)
        if slab is not None:
            new[:, :, :cap] = slab
        self.slabs[seq_id] = new
        return new

    def prepare(self, plan: StepPlan) -> SdpaContext:
        for seq_id in plan.freed:
            self.slabs.pop(seq_id, None)
        slots, offset = [], 0
        for st in plan.seqs:
            n = len(st.token_ids)
            slots.append(_Slot(self._slab(st.seq_id, st.start + n), st.start, n, offset))
            offset += n
        return SdpaContext(slots, positions_of(plan, self.spec.device), self.scale, self.spec)


class NoCacheContext(CacheContext):
    """Attention over the step's own tokens as one causal sequence, storing nothing (memory profiling)."""

    def __init__(self, positions: torch.Tensor, scale: float):
        self.positions = positions
        self.scale = scale

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend_one(q, k, v, 0, self.scale)
