"""One FlashInfer step's attention context: the page-table CSR, the planned kernels, and per layer the
KV append and the attention call.

A mixed step (prefill chunks and decode rows) with `cache.mixed_attention=split` runs its leading
one-token rows through the decode kernel and the rest through the prefill kernel, two calls a layer,
as vLLM's FlashInfer backend does. The prefill kernel tiles queries by 64-128 rows, so a lone decode
row there takes a whole tile across every key of its context: many such rows at long contexts add
much of the chunk's own time. `one` runs every row through the prefill kernel, which hides a few
decode rows' reads under the chunk's compute (experiments/README.md, twentieth wave).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoslg.cache.backend import CacheContext
from nanoslg.core.plan import StepPlan


def leading_decode_rows(plan: StepPlan) -> int:
    """The one-token rows a mixed step starts with (the scheduler puts running sequences first); 0
    for a step with no prefill rows after them, which runs as one call either way."""
    n = 0
    for st in plan.seqs:
        if len(st.token_ids) != 1:
            return n
        n += 1
    return 0


@dataclass(eq=False)
class FlashInferContext(CacheContext):
    """One step. The kernels are planned once: in prepare when the query head count is known, else
    at the first layer's attend (from q's shape); every later layer reuses that plan."""

    backend: object  # FlashInferBackend
    decode: bool
    csr: tuple  # cascade: each sequence's own pages only (its KV positions count from there)
    pool: torch.Tensor
    positions: torch.Tensor
    batch_indices: torch.Tensor
    kv_positions: torch.Tensor
    kv_indices: torch.Tensor
    kv_indptr: torch.Tensor
    kv_last_page_len: torch.Tensor
    shared: list[int] | None = None  # cascade: the pages every sequence starts with
    max_q: int = 1  # the most query tokens of one sequence
    max_pages: int = 0  # the most pages of one sequence past the shared ones (XQA's table width)
    fused: bool = False  # attend_rotary runs the fused decode kernel (nothing to plan for it)
    wrapper: object = None  # planned by plan_once
    level0: object = None
    # A split mixed step: its first `split` rows (one token each) through the decode kernel over
    # split_csr[0], the rest through the prefill kernel over split_csr[1].
    split: int = 0
    split_csr: tuple = ()
    wrapper2: object = None

    def plan_once(self, num_qo_heads: int) -> None:
        if self.wrapper is None:
            b = self.backend
            if self.split:
                self.wrapper = b.plan_step(True, self.split_csr[0], num_qo_heads)
                self.wrapper2 = b.plan_step(False, self.split_csr[1], num_qo_heads, self.max_q)
                return
            if self.decode and self.shared is None and b.xqa:
                self.wrapper = b.xqa_eager(self.kv_indptr, self.kv_indices, self.kv_last_page_len, self.max_pages)
                return
            self.wrapper = b.plan_step(self.decode, self.csr, num_qo_heads, self.max_q)
            if self.shared is not None:
                self.level0 = b.plan_shared(len(self.csr[0]) - 1, self.shared, num_qo_heads)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.plan_once(q.shape[1])
        cache = self.pool[layer]
        k, v, scales = self.backend.kv_in(layer, k, v)
        pages = self.batch_indices, self.kv_positions, cache, self.kv_indices, self.kv_indptr, self.kv_last_page_len
        self.backend.fi.page.append_paged_kv_cache(k, v, *pages, kv_layout="NHD")
        if self.split:
            d, run = self.split, self.backend.run_attention
            head = run(self.wrapper, None, q[:d], cache, scales)
            return torch.cat([head, run(self.wrapper2, None, q[d:], cache, scales)])
        return self.backend.run_attention(self.wrapper, self.level0, q, cache, scales)

    def attend_rotary(self, layer: int, q, k, v, positions: torch.Tensor, rotary) -> torch.Tensor:
        if self.fused:
            args = self.kv_positions, self.kv_indices, self.kv_indptr
            return self.backend.fused_attend(layer, q, k, v, positions, rotary, *args)
        if not (self.decode and self.backend.fused_rope):
            return super().attend_rotary(layer, q, k, v, positions, rotary)
        self.plan_once(q.shape[1])
        cache = self.pool[layer]
        args = self.batch_indices, self.kv_positions, self.kv_indices, self.kv_indptr
        q, scales = self.backend.rope_append(layer, q, k, v, positions, rotary, cache, *args)
        return self.backend.run_attention(self.wrapper, self.level0, q, cache, scales)


@dataclass
class EmptyContext(CacheContext):
    positions: torch.Tensor

    def attend(self, layer, q, k, v):  # a step with no sequences runs no layers
        raise RuntimeError("attend called on an empty step")
