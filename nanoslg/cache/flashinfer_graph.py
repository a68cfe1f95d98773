"""CUDA graphs for FlashInfer decode steps.

One graph per batch-size bucket, captured at start. Inputs live in fixed buffers; before each
replay the step's page tables are written there by the wrapper's `plan()` (run outside the graph).
A bucket larger than the batch is filled with padding rows that read and write one scratch page,
which the KV manager never hands out. Buckets of MIN_BATCH or more also get a cascade-attention
twin (nanoslg/cache/cascade.py), replayed when every sequence starts with the same cached pages;
padding rows attend those pages too, and their output is dropped.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from nanoslg.cache.base import CacheContext
from nanoslg.cache.cascade import MIN_BATCH, shared_prefix_pages
from nanoslg.cache.flashinfer_backend import cascade_run
from nanoslg.scheduler.plan import StepPlan
from nanoslg.tensors import pinned, to_device

log = logging.getLogger("nanoslg.graphs")
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class _GraphContext(CacheContext):
    def __init__(self, graphs: "DecodeGraphs", bs: int, wrapper, level0=None):
        self.g, self.bs, self.wrapper, self.level0 = graphs, bs, wrapper, level0
        self.positions = graphs.positions[:bs]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g, bs = self.g, self.bs
        cache = g.backend.pool[layer]
        g.fi.page.append_paged_kv_cache(k, v, g.batch_idx[:bs], g.kv_pos[:bs], cache,
                                        g.indices, g.indptr[:bs + 1], g.last_len[:bs], kv_layout="NHD")
        if self.level0 is None:
            return self.wrapper.run(q.contiguous(), cache)
        return cascade_run(g.fi, self.wrapper, self.level0, q.contiguous(), cache)


class DecodeGraphs:
    """Captured decode graphs of one model over a FlashInfer backend (single GPU)."""

    def __init__(self, model, backend, max_bs: int, max_model_len: int):
        self.model, self.backend, self.fi = model, backend, backend.fi
        s = backend.spec
        dev = s.device
        self.buckets = [b for b in BUCKETS if b <= max_bs] or [1]
        self.max_bs = self.buckets[-1]
        i32 = torch.int32
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.long, device=dev)
        self.positions = torch.zeros(self.max_bs, dtype=torch.long, device=dev)
        self.kv_pos = torch.zeros(self.max_bs, dtype=i32, device=dev)
        self.batch_idx = torch.arange(self.max_bs, dtype=i32, device=dev)
        self.indptr = torch.zeros(self.max_bs + 1, dtype=i32, device=dev)
        self.last_len = torch.zeros(self.max_bs, dtype=i32, device=dev)
        # Shared prefix pages appear once per sequence, so size for every row at full length.
        self.indices = torch.zeros(self.max_bs * -(-max_model_len // backend.page_size) + self.max_bs,
                                   dtype=i32, device=dev)
        self.group = s.num_qo_heads // s.num_kv_heads
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, object]] = {}
        # Cascade (a second graph per bucket of MIN_BATCH or more): level 0's own small buffers; the
        # per-sequence level reuses the buffers above, holding only each row's own pages.
        self.cascade = backend.cascade
        self.shared_qo = torch.zeros(2, dtype=i32, device=dev)
        self.shared_indptr = torch.zeros(2, dtype=i32, device=dev)
        self.shared_indices = torch.zeros(-(-max_model_len // backend.page_size), dtype=i32, device=dev)
        self.shared_last = torch.zeros(1, dtype=i32, device=dev)
        self.cascade_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, object, object]] = {}
        self._level0_key = None  # (bucket, shared pages) the level-0 buffers were last planned for

    def _wrapper(self, bs: int):
        return self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self.backend._decode_ws, "NHD", use_cuda_graph=True, use_tensor_cores=self.group >= 4,
            paged_kv_indptr_buffer=self.indptr[:bs + 1], paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=self.last_len[:bs])

    def _level0_wrapper(self):
        return self.fi.BatchPrefillWithPagedKVCacheWrapper(
            self.backend._prefill_ws, "NHD", use_cuda_graph=True, qo_indptr_buf=self.shared_qo,
            paged_kv_indptr_buf=self.shared_indptr, paged_kv_indices_buf=self.shared_indices,
            paged_kv_last_page_len_buf=self.shared_last, backend="fa2")

    def _plan(self, wrapper, bs: int, plan: StepPlan | None, input_ids: torch.Tensor | None = None,
              skip: int = 0) -> None:
        """Writes the batch (real rows, then padding rows on the scratch page) and plans the wrapper.
        skip > 0 (cascade): each row holds its pages from page `skip` on, KV positions counted from there.
        It runs every decode step, so the per-row work is one slice; the rest is numpy."""
        ps, scratch = self.backend.page_size, self.backend.scratch_page
        seqs = plan.seqs if plan is not None else []
        n, pad = len(seqs), bs - len(seqs)
        starts = np.fromiter((st.start for st in seqs), np.int32, n)
        pages = starts // ps + 1  # pages holding positions 0..start
        indices: list[int] = []
        extend = indices.extend
        for st, p in zip(seqs, pages.tolist()):
            extend(st.block_table[skip:p])
        indices.extend([scratch] * pad)
        counts = np.ones(bs, np.int32)  # a padding row holds the scratch page
        counts[:n] = pages - skip
        indptr = np.zeros(bs + 1, np.int32)
        np.cumsum(counts, out=indptr[1:])
        last = np.ones(bs, np.int32)
        last[:n] = starts + 1 - (pages - 1) * ps
        # One host-to-device copy: positions, KV positions, then the page indices.
        host = np.empty(2 * bs + len(indices), np.int32)
        host[:bs] = 0
        host[:n] = starts
        host[bs:2 * bs] = host[:bs]
        host[bs:bs + n] -= skip * ps
        host[2 * bs:] = indices
        dev = to_device(host, torch.int32, self.input_ids.device)
        if input_ids is not None:
            self.input_ids[:n].copy_(input_ids)
        if pad:
            self.input_ids[n:bs].zero_()
        self.positions[:bs].copy_(dev[:bs])
        self.kv_pos[:bs].copy_(dev[bs:2 * bs])
        s = self.backend.spec
        # Indices go in as a device tensor: in CUDA-graph mode FlashInfer copies host indices into its
        # buffer with a blocking copy, which would stall the host until the step in flight finished.
        self.backend.run_plan(wrapper, pinned(indptr, torch.int32), dev[2 * bs:], pinned(last, torch.int32),
                              s.num_qo_heads, s.num_kv_heads, s.head_dim, ps, q_data_type=s.dtype,
                              kv_data_type=s.dtype, sm_scale=self.backend.scale)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for bs in tqdm(list(reversed(self.buckets)), desc="capturing CUDA graphs"):
            wrapper = self._wrapper(bs)
            self._plan(wrapper, bs, None)
            self.graphs[bs] = (*self._capture_one(_GraphContext(self, bs, wrapper), pool), wrapper)
            if self.cascade and bs >= MIN_BATCH:
                self.cascade_graphs[bs] = self._capture_cascade(bs, pool)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s%s", self.buckets,
                 f" (and cascade-attention twins from {MIN_BATCH})" if self.cascade_graphs else "")

    def _capture_cascade(self, bs: int, pool):
        wrapper, level0 = self._wrapper(bs), self._level0_wrapper()
        self._plan(wrapper, bs, None)
        self.backend.plan_shared(bs, [self.backend.scratch_page], self.backend.spec.num_qo_heads, level0)
        self._level0_key = None
        return (*self._capture_one(_GraphContext(self, bs, wrapper, level0), pool), wrapper, level0)

    def _capture_one(self, ctx: _GraphContext, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """One decode step of ctx's bucket, run once outside the graph (warm-up), then captured."""
        ids, pos = self.input_ids[:ctx.bs], self.positions[:ctx.bs]
        self.model.compute_logits(self.model(ids, pos, ctx))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self.model.compute_logits(self.model(ids, pos, ctx))
        return graph, logits

    def can_run(self, plan: StepPlan) -> bool:
        return 0 < len(plan.seqs) <= self.max_bs and not plan.copies and plan.is_sampled_decode

    def run(self, plan: StepPlan, input_ids: torch.Tensor) -> torch.Tensor:
        """Replays the smallest bucket that holds the batch; returns the real rows' logits."""
        n = len(plan.seqs)
        bs = next(b for b in self.buckets if b >= n)
        skip = shared_prefix_pages(plan.seqs, self.backend.page_size) if bs in self.cascade_graphs else 0
        if skip:
            graph, logits, wrapper, level0 = self.cascade_graphs[bs]
            key = (bs, tuple(plan.seqs[0].block_table[:skip]))
            if key != self._level0_key:  # else level 0's buffers and plan already hold these pages
                self.backend.plan_shared(bs, list(key[1]), self.backend.spec.num_qo_heads, level0)
                self._level0_key = key
            self.backend.cascade_steps += 1
        else:
            graph, logits, wrapper = self.graphs[bs]
        self._plan(wrapper, bs, plan, input_ids, skip)
        graph.replay()
        return logits[:n]
