"""The `paged` backend: a page pool in plain torch, attention by gathering each sequence's pages.

It runs anywhere torch runs, so the paged manager, prefix caching, copy-on-write and cascade
attention (nanoslg/cache/cascade.py) are exercised end to end on the CPU in CI. The pool is one
tensor [layers, 2, num_pages, page_size, Hkv, D]; token slots (page * page_size + offset) are
computed once per step in `prepare`, not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoslg.cache.backend import CacheBackend, CacheContext, KVSpec, positions_of
from nanoslg.cache.cascade import attend_lse, merge, shared_prefix_pages
from nanoslg.cache.kv_quant import as_bytes, gather, store
from nanoslg.cache.sdpa import attend_one
from nanoslg.core.plan import StepPlan
from nanoslg.core.registry import CACHE_BACKENDS
from nanoslg.core.tensors import to_device


def step_slots(plan: StepPlan, page_size: int, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(slots of the step's new tokens [T], per sequence the slots of all its KV positions [start+n])."""
    new, kv = [], []
    for st in plan.seqs:
        if st.block_table is None:
            raise ValueError("the paged backend needs block tables: use it with a paged KV manager")
        end = st.start + len(st.token_ids)
        table = torch.tensor(st.block_table, dtype=torch.long)
        pos = torch.arange(end)
        slots = table[pos // page_size] * page_size + pos % page_size
        kv.append(slots.to(device))
        new.append(slots[st.start :])
    return torch.cat(new).to(device), kv


@dataclass
class _Seq:
    start: int
    n: int
    offset: int
    slots: torch.Tensor  # slots of positions 0..start+n-1


@dataclass(eq=False)
class PagedTorchContext(CacheContext):
    pool: torch.Tensor
    new_slots: torch.Tensor
    seqs: list[_Seq]
    positions: torch.Tensor
    scale: float
    spec: KVSpec
    shared: torch.Tensor | None = None  # cascade: slots of the prefix every sequence shares (seq slots exclude it)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc = self.pool[layer, 0].flatten(0, 1)  # [pages * page_size, Hkv, D], a view
        vc = self.pool[layer, 1].flatten(0, 1)
        scales = self.spec.scales(layer)
        # All new KV is written first (one op per layer), then each sequence reads its pages. An FP8
        # pool stores x / scale and is read back upcast (kv_quant.py).
        store(kc, vc, self.new_slots, k, v, scales)

        def read(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return gather(kc, vc, slots, scales, q.dtype)

        if self.shared is not None:
            return self._cascade(q, read)
        out = torch.empty_like(q)
        for s in self.seqs:
            rows = slice(s.offset, s.offset + s.n)
            out[rows] = attend_one(q[rows], *read(s.slots), s.start, self.scale)
        return out

    def _cascade(self, q: torch.Tensor, read) -> torch.Tensor:
        """A decode step: every query against the shared prefix at once, then each against its own
        pages, merged by log-sum-exp (one query per sequence, so neither level needs a mask)."""
        out0, lse0 = attend_lse(q, *read(self.shared), self.scale)
        own = [attend_lse(q[s.offset : s.offset + 1], *read(s.slots), self.scale) for s in self.seqs]
        out1, lse1 = torch.cat([o for o, _ in own]), torch.cat([lse for _, lse in own])
        return merge(out0, lse0, out1, lse1).to(q.dtype)


@CACHE_BACKENDS.register("paged")
class PagedTorchBackend(CacheBackend):
    name = "paged"
    paged = True

    def __init__(self, spec: KVSpec, page_size: int):
        super().__init__(spec, page_size)
        self.pool: torch.Tensor | None = None

    def allocate(self, num_pages: int) -> None:
        s = self.spec
        self.pool = torch.zeros(
            s.num_layers, 2, num_pages, self.page_size, s.num_kv_heads, s.head_dim, dtype=s.cache_dtype, device=s.device
        )

    def run_copies(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src = to_device([c[0] for c in copies], torch.long, self.pool.device)
            dst = to_device([c[1] for c in copies], torch.long, self.pool.device)
            pool = as_bytes(self.pool)  # indexing kernels may lack float8; bytes copy the same
            pool[:, :, dst] = pool[:, :, src]

    def prepare(self, plan: StepPlan) -> PagedTorchContext:
        if self.pool is None:
            raise RuntimeError("the paged pool is not allocated: call allocate(num_pages) first")
        self.run_copies(plan.copies)
        dev = self.spec.device
        if not plan.seqs:
            empty = torch.empty(0, dtype=torch.long, device=dev)
            return PagedTorchContext(self.pool, empty, [], empty, self.scale, self.spec)
        new_slots, kv_slots = step_slots(plan, self.page_size, dev)
        shared = (
            shared_prefix_pages(plan.seqs, self.page_size) * self.page_size if self.cascade and plan.is_decode else 0
        )
        seqs, offset = [], 0
        for st, slots in zip(plan.seqs, kv_slots):
            seqs.append(_Seq(st.start, len(st.token_ids), offset, slots[shared:]))
            offset += len(st.token_ids)
        if shared:
            self.cascade_steps += 1
        return PagedTorchContext(
            self.pool,
            new_slots,
            seqs,
            positions_of(plan, dev),
            self.scale,
            self.spec,
            kv_slots[0][:shared] if shared else None,
        )
