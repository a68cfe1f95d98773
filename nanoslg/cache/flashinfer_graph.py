"""What FlashInfer needs to run decode steps inside CUDA graphs: fixed buffers and wrappers per bucket.

The graph runner (nanoslg/runtime/graph_runner.py) captures and replays; this file is the backend's
side of it. Before each replay the step's page tables are written into the fixed buffers by the
wrapper's `plan()` (run outside the graph). Padding rows of a bucket larger than the batch read and
write one scratch page, which the KV manager never hands out. Buckets of MIN_BATCH or more also get
a cascade-attention variant (nanoslg/cache/cascade.py), replayed when every sequence starts with the
same cached pages; padding rows attend those pages too, and their output is dropped.

With `cache.flashinfer_decode=xqa` the plain variant runs XQA (xqa_decode.py) instead of the decode
wrapper: no plan(); the host writes the CSR into the buffers itself, and the captured graph's first
layer turns it into XQA's page table. With `cache.flashinfer_decode=fused`, buckets of up to the
backend's fused_rows rows run the fused decode kernel (kernels/fused_decode.py), which reads the CSR
as the host writes it: no plan() either.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from nanoslg.cache.backend import CacheContext
from nanoslg.cache.cascade import MIN_BATCH, shared_prefix_pages
from nanoslg.cache.xqa_decode import XqaDecode, XqaStep
from nanoslg.core.plan import StepPlan
from nanoslg.core.tensors import pinned, to_device

FUSED = "fused"  # a bucket's "wrapper" where the fused decode kernel runs its attention


class _GraphContext(CacheContext):
    def __init__(self, g: FlashInferGraphs, bs: int, wrapper, level0=None):
        self.g, self.bs, self.wrapper, self.level0 = g, bs, wrapper, level0
        self.positions = g.positions[:bs]
        self._last_layer = None

    def _step_start(self, layer: int) -> None:
        """XQA: the page table, built once a forward pass (at its first layer; a warm-up and then the
        capture each run every layer once)."""
        if isinstance(self.wrapper, XqaStep) and (self._last_layer is None or layer <= self._last_layer):
            g, bs = self.g, self.bs
            g.xqa.fill(g.indptr[: bs + 1], g.indices, g.last_len[:bs])
        self._last_layer = layer

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.wrapper is FUSED:
            raise RuntimeError("a fused decode bucket attends through attend_rotary (the kernel applies the rotary)")
        self._step_start(layer)
        g, bs = self.g, self.bs
        cache = g.backend.pool[layer]
        k, v, scales = g.backend.kv_in(layer, k, v)  # an FP8 pool: cast before the append, scales to run()
        g.fi.page.append_paged_kv_cache(
            k,
            v,
            g.batch_idx[:bs],
            g.kv_pos[:bs],
            cache,
            g.indices,
            g.indptr[: bs + 1],
            g.last_len[:bs],
            kv_layout="NHD",
        )
        return g.backend.run_attention(self.wrapper, self.level0, q, cache, scales)

    def attend_rotary(self, layer: int, q, k, v, positions: torch.Tensor, rotary) -> torch.Tensor:
        g, bs = self.g, self.bs
        if self.wrapper is FUSED:
            args = g.kv_pos[:bs], g.indices, g.indptr[: bs + 1]
            return g.backend.fused_attend(layer, q, k, v, positions, rotary, *args)
        if not g.backend.fused_rope:
            return super().attend_rotary(layer, q, k, v, positions, rotary)
        self._step_start(layer)
        cache = g.backend.pool[layer]
        args = g.batch_idx[:bs], g.kv_pos[:bs], g.indices, g.indptr[: bs + 1]
        q, scales = g.backend.rope_append(layer, q, k, v, positions, rotary, cache, *args)
        return g.backend.run_attention(self.wrapper, self.level0, q, cache, scales)


class FlashInferGraphs:
    """The fixed buffers and planned wrappers of every captured bucket of one FlashInfer backend."""

    def __init__(self, backend, decode_ws: torch.Tensor, prefill_ws: torch.Tensor, max_bs: int, max_model_len: int):
        # A proxy: the backend owns these buffers, and a cycle between them would outlive the engine.
        self.backend, self.fi = weakref.proxy(backend), backend.fi
        self.decode_ws, self.prefill_ws = decode_ws, prefill_ws
        s = backend.spec
        dev, i32 = s.device, torch.int32
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.kv_pos = torch.zeros(max_bs, dtype=i32, device=dev)
        self.batch_idx = torch.arange(max_bs, dtype=i32, device=dev)
        self.indptr = torch.zeros(max_bs + 1, dtype=i32, device=dev)
        self.last_len = torch.zeros(max_bs, dtype=i32, device=dev)
        # Shared prefix pages appear once per sequence, so size for every row at full length.
        self.indices = torch.zeros(max_bs * -(-max_model_len // backend.page_size) + max_bs, dtype=i32, device=dev)
        # Cascade level 0's own small buffers; the per-sequence level reuses the buffers above,
        # holding only each row's own pages.
        self.shared_qo = torch.zeros(2, dtype=i32, device=dev)
        self.shared_indptr = torch.zeros(2, dtype=i32, device=dev)
        self.shared_indices = torch.zeros(-(-max_model_len // backend.page_size), dtype=i32, device=dev)
        self.shared_last = torch.zeros(1, dtype=i32, device=dev)
        self.wrappers: dict[tuple[int, str], tuple] = {}  # (bucket, variant) -> (wrapper, level-0 wrapper)
        self._level0_key = None  # (bucket, shared pages) the level-0 buffers were last planned for
        self.xqa = None
        if backend.xqa:
            max_pages = -(-max_model_len // backend.page_size)
            self.xqa = XqaDecode(backend.fi, s, backend.page_size, backend.scale, max_bs, max_pages)

    def variants(self, bs: int) -> tuple[str, ...]:
        return ("plain", "cascade") if self.backend.cascade and bs >= MIN_BATCH else ("plain",)

    def _wrapper(self, bs: int):
        return self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self.decode_ws,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=self.backend.decode_tensor_cores,
            paged_kv_indptr_buffer=self.indptr[: bs + 1],
            paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=self.last_len[:bs],
        )

    def _level0_wrapper(self):
        return self.fi.BatchPrefillWithPagedKVCacheWrapper(
            self.prefill_ws,
            "NHD",
            use_cuda_graph=True,
            qo_indptr_buf=self.shared_qo,
            paged_kv_indptr_buf=self.shared_indptr,
            paged_kv_indices_buf=self.shared_indices,
            paged_kv_last_page_len_buf=self.shared_last,
            backend="fa2",
        )

    def capture_context(self, bs: int, variant: str) -> CacheContext:
        """A context over the fixed buffers, planned for a batch of padding rows only."""
        if variant == "plain" and bs <= self.backend.fused_rows:
            wrapper = FUSED
        elif variant == "plain" and self.xqa is not None:
            wrapper = XqaStep(self.xqa, bs)
        else:
            wrapper = self._wrapper(bs)
        self._plan(wrapper, bs, None)
        level0 = None
        if variant == "cascade":
            level0 = self._level0_wrapper()
            self.backend.plan_shared(bs, [self.backend.scratch_page], self.backend.spec.num_qo_heads, level0)
            self._level0_key = None
        self.wrappers[(bs, variant)] = (wrapper, level0)
        return _GraphContext(self, bs, wrapper, level0)

    def prepare_replay(self, bs: int, plan: StepPlan) -> str:
        """Writes the step into bucket bs's buffers and plans its wrapper; returns the variant to replay."""
        skip = shared_prefix_pages(plan.seqs, self.backend.page_size) if (bs, "cascade") in self.wrappers else 0
        if skip:
            wrapper, level0 = self.wrappers[(bs, "cascade")]
            key = (bs, tuple(plan.seqs[0].block_table[:skip]))
            if key != self._level0_key:  # else level 0's buffers and plan already hold these pages
                self.backend.plan_shared(bs, list(key[1]), self.backend.spec.num_qo_heads, level0)
                self._level0_key = key
            self.backend.cascade_steps += 1
        else:
            wrapper = self.wrappers[(bs, "plain")][0]
        self._plan(wrapper, bs, plan, skip)
        return "cascade" if skip else "plain"

    def _plan(self, wrapper, bs: int, plan: StepPlan | None, skip: int = 0) -> None:
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
        # One host-to-device copy: positions, KV positions, the page indices, and for XQA and the fused
        # kernel (no plan() to copy them) the indptr and last page lengths.
        no_plan, m = isinstance(wrapper, XqaStep) or wrapper is FUSED, len(indices)
        host = np.empty(2 * bs + m + (2 * bs + 1 if no_plan else 0), np.int32)
        host[:bs] = 0
        host[:n] = starts
        host[bs : 2 * bs] = host[:bs]
        host[bs : bs + n] -= skip * ps
        host[2 * bs : 2 * bs + m] = indices
        if no_plan:
            host[2 * bs + m : 3 * bs + m + 1] = indptr
            host[3 * bs + m + 1 :] = last
        dev = to_device(host, torch.int32, self.positions.device)
        self.positions[:bs].copy_(dev[:bs])
        self.kv_pos[:bs].copy_(dev[bs : 2 * bs])
        if no_plan:
            self.indices[:m].copy_(dev[2 * bs : 2 * bs + m])
            self.indptr[: bs + 1].copy_(dev[2 * bs + m : 3 * bs + m + 1])
            self.last_len[:bs].copy_(dev[3 * bs + m + 1 :])
            return
        s = self.backend.spec
        # Indices go in as a device tensor: in CUDA-graph mode FlashInfer copies host indices into its
        # buffer with a blocking copy, which would stall the host until the step in flight finished.
        self.backend.run_plan(
            wrapper,
            pinned(indptr, torch.int32),
            dev[2 * bs :],
            pinned(last, torch.int32),
            s.num_qo_heads,
            s.num_kv_heads,
            s.head_dim,
            ps,
            q_data_type=s.dtype,
            kv_data_type=s.cache_dtype,
            sm_scale=self.backend.scale,
        )
