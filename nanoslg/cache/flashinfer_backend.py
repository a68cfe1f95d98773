"""The `flashinfer` backend (GPU): a paged pool and FlashInfer's batched attention kernels.

- Pool: [layers, num_pages, 2, page_size, Hkv, D] ("NHD", K and V interleaved per page), so
  `pool[layer]` is the 5-D paged cache FlashInfer takes as is.
- Per step, `prepare` builds the page-table CSR once and plans the step's wrapper once; each layer
  appends its new K/V and runs the planned kernel. Steps with a prefill chunk use the prefill wrapper,
  causal (aligned bottom-right); decode steps the decode wrapper (tensor cores from a GQA group of 4),
  XQA (xqa_decode.py), or, asked for (`cache.flashinfer_decode=fused`) and at a few rows, our one
  Triton kernel for rotary, append and attention, which needs no plan() (kernels/fused_decode.py;
  decode_choice.py says which runs).
- A decode step whose sequences all start with the same cached pages runs cascade attention
  (cascade.py): the shared pages once for the batch, each sequence's own by the decode wrapper.
- An FP8 pool (`cache.kv_dtype=fp8_e4m3`, kv_quant.py): plan() is told the KV dtype, new K/V are
  cast (divided by the layer's scale) before the append, and run() gets the scales back.

flashinfer is imported only when this backend is built, so CPU machines never import it.
"""

from __future__ import annotations

import torch

from nanoslg.cache.auto import flashinfer_status
from nanoslg.cache.backend import CacheBackend, CacheContext, KVSpec, positions_of
from nanoslg.cache.cascade import shared_prefix_pages
from nanoslg.cache.decode_choice import fused_rows, uses_tensor_cores
from nanoslg.cache.flashinfer_graph import FlashInferGraphs
from nanoslg.cache.flashinfer_step import EmptyContext, FlashInferContext, leading_decode_rows
from nanoslg.cache.kv_quant import FP8, as_bytes, is_fp8, to_cache_pair
from nanoslg.cache.xqa_decode import XqaDecode, XqaStep, xqa_choice
from nanoslg.core.errors import ConfigError
from nanoslg.core.plan import StepPlan
from nanoslg.core.registry import CACHE_BACKENDS
from nanoslg.core.tensors import pinned, to_device

WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended float workspace per wrapper


def _import_flashinfer(device: torch.device):
    ok, why = flashinfer_status(device)
    if not ok:
        raise ConfigError(
            f"cache.backend=flashinfer cannot run here: {why}; use cache.backend=sdpa "
            "(or cache=auto, which picks what runs)"
        )
    import flashinfer  # deferred: a GPU-only dependency, imported when this backend is built

    return flashinfer


@CACHE_BACKENDS.register("flashinfer")
class FlashInferBackend(CacheBackend):
    name = "flashinfer"
    paged = True
    supports_graphs = True

    def __init__(self, spec: KVSpec, page_size: int, num_qo_heads: int | None = None):
        super().__init__(spec, page_size)
        self.fi = _import_flashinfer(spec.device)
        if spec.dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(
                f"cache.backend=flashinfer runs bfloat16 or float16, not {spec.dtype}; "
                "set model.dtype=bfloat16 (or float16), or use cache.backend=sdpa"
            )
        # This rank's query head count (tensor parallelism shards it). KVSpec does not carry it, so
        # the first step reads it from q; from then on plan() runs in prepare.
        self.num_qo_heads = num_qo_heads or spec.num_qo_heads or None
        self.pool: torch.Tensor | None = None
        dev = spec.device
        self._prefill_ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        self._prefill = self.fi.BatchPrefillWithPagedKVCacheWrapper(self._prefill_ws, "NHD")
        self._shared = None  # cascade level 0, built at its first use
        self._decode_ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        self._decode = None  # built once the GQA group size is known (tensor cores or not)
        self._plan_events: dict = {}  # wrapper -> event recorded after its last plan()
        self._graphs: FlashInferGraphs | None = None  # the CUDA-graph buffers, once init_graphs ran
        self.decode_choice = "auto"  # cache.flashinfer_decode (configure)
        self.xqa = False  # decode steps without a cascade run XQA (xqa_decode.py)
        self._xqa_eager: XqaDecode | None = None  # its buffers for eager decode steps, grown on demand
        self.fused_rope = False  # cache.fused_rope (configure)
        self.fused_rows, self._fused = 0, None  # decode steps of up to fused_rows rows: the fused kernel, its scratch
        self.split_mixed, self.split_steps = False, 0  # cache.mixed_attention=split (flashinfer_step.py), steps split

    def configure(self, cache_cfg) -> str:
        self.decode_choice = cache_cfg.flashinfer_decode
        kind = "tensor-core" if self.decode_tensor_cores else "CUDA-core"
        hq = self.num_qo_heads or self.spec.num_qo_heads
        xqa = xqa_choice(self.fi, self.spec, self.page_size, hq, self.decode_choice, kind)
        self.xqa, kind = xqa is not None, xqa or kind
        self.fused_rope = cache_cfg.fused_rope == "auto"
        rope = "one kernel" if self.fused_rope else "FlashInfer's rope, then its append"
        if self.fused_rope and is_fp8(self.spec.cache_dtype):
            rope += ", which casts k and v to FP8 as it stores them"
        self.fused_rows, fused = fused_rows(self.spec, self.decode_choice, self.fused_rope)
        self.split_mixed = cache_cfg.mixed_attention == "split"
        return (
            f"{kind} decode kernel (cache.flashinfer_decode={self.decode_choice}){fused}; "
            f"decode steps' rotary and KV append: {rope} (cache.fused_rope={cache_cfg.fused_rope}); "
            f"a mixed step's decode rows: {'the decode kernel' if self.split_mixed else 'the prefill kernel'} "
            f"(cache.mixed_attention={cache_cfg.mixed_attention})"
        )

    def rope_append(self, layer, q, k, v, positions, rotary, cache, batch_indices, kv_positions, kv_indices, indptr):
        """A decode step's rotary and KV append in one kernel (kernels/rope_append.py): the rotated q,
        contiguous, for the attention kernel, and the run() arguments that scale an FP8 pool back."""
        from nanoslg.cache.kernels.rope_append import rope_append  # deferred: imports Triton

        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        args = batch_indices, kv_positions, kv_indices, indptr, out
        rope_append(q, k, v, positions, rotary.cos_sin_cache, cache, *args, scales=self.spec.scales(layer))
        return out, self.run_scales(layer)

    def fused_attend(self, layer, q, k, v, positions, rotary, kv_positions, kv_indices, indptr) -> torch.Tensor:
        if self._fused is None:  # the scratch of fused_rows rows, for eager steps and every graph
            from nanoslg.cache.kernels.fused_decode import FusedDecode  # deferred: imports Triton

            self._fused = FusedDecode(self.fused_rows, q.shape[1], k.shape[1], q.shape[2], q.device)
        cos_sin, cache = rotary.cos_sin_cache, self.pool[layer]
        return self._fused.run(q, k, v, positions, cos_sin, cache, kv_positions, kv_indices, indptr, self.scale)

    @property
    def decode_tensor_cores(self) -> bool:
        s = self.spec
        return uses_tensor_cores(self.decode_choice, (self.num_qo_heads or s.num_qo_heads) // s.num_kv_heads)

    def allocate(self, num_pages: int) -> None:
        s = self.spec
        # One page more than the manager hands out: CUDA-graph padding rows read and write it.
        self.scratch_page = num_pages
        self.pool = torch.zeros(
            s.num_layers,
            num_pages + 1,
            2,
            self.page_size,
            s.num_kv_heads,
            s.head_dim,
            dtype=s.cache_dtype,
            device=s.device,
        )

    def run_copies(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            dev = self.pool.device
            src = to_device([c[0] for c in copies], torch.long, dev)
            dst = to_device([c[1] for c in copies], torch.long, dev)
            pool = as_bytes(self.pool)  # indexing kernels may lack float8; bytes copy the same
            pool[:, dst] = pool[:, src]

    # -- CUDA-graph hooks (flashinfer_graph.py holds the buffers) --------------------------------
    def init_graphs(self, max_bs: int, max_model_len: int) -> None:
        self._graphs = FlashInferGraphs(self, self._decode_ws, self._prefill_ws, max_bs, max_model_len)

    def graph_variants(self, bs: int) -> tuple[str, ...]:
        return self._graphs.variants(bs)

    def capture_context(self, bs: int, variant: str) -> CacheContext:
        return self._graphs.capture_context(bs, variant)

    def prepare_replay(self, bs: int, plan: StepPlan) -> str:
        return self._graphs.prepare_replay(bs, plan)

    def kv_in(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """k, v as the pool stores them, and the run() arguments that scale them back (FP8 pools)."""
        scales = self.run_scales(layer)
        if scales:
            k, v = to_cache_pair(k, v, self.spec.scales(layer), FP8)
        return k, v, scales

    def run_scales(self, layer: int) -> dict:
        """The run() arguments that scale an FP8 pool's K and V back; none for a pool in the model's dtype."""
        if not is_fp8(self.spec.cache_dtype):
            return {}
        ks, vs = self.spec.scales(layer)
        return {"k_scale": ks, "v_scale": vs}

    def run_attention(self, own, shared, q: torch.Tensor, cache: torch.Tensor, scales: dict) -> torch.Tensor:
        """The planned attention: each query against its own pages; with a cascade level 0 (shared),
        also against the shared prefix, the two merged by log-sum-exp."""
        q = q.contiguous()
        if shared is None:
            return own.run(q, cache, **scales)
        out, lse = own.run(q, cache, return_lse=True, **scales)
        out0, lse0 = shared.run(q, cache, return_lse=True, **scales)
        self.fi.merge_state_in_place(out, lse, out0, lse0)
        return out

    @property
    def max_pages(self) -> int:
        """Pages of the longest sequence (0 where max_model_len is not known)."""
        return -(-self.spec.max_model_len // self.page_size)

    def xqa_eager(self, indptr, indices, last_len, max_pages: int) -> XqaStep:
        """An eager decode step's XQA attention: its table built from the CSR on the device. The table
        is as wide as the graphs' (max_model_len's pages): XQA splits a short context over blocks up
        to a count its width caps, so one width keeps a step's result independent of the steps before
        it and the same as in a graph. Its rows grow with the largest step; the workspace is kept."""
        bs, x = indptr.shape[0] - 1, self._xqa_eager
        if x is None or x.rows < bs or x.table.shape[1] < max_pages:
            (rows, width), ws = ((64, 0), None) if x is None else (x.table.shape, x.workspace)
            rows, width = max(bs, 2 * rows if bs > rows else rows), max(max_pages, width, self.max_pages)
            x = XqaDecode(self.fi, self.spec, self.page_size, self.scale, rows, width, ws)
            self._xqa_eager = x
        return x.fill(indptr, indices, last_len)

    def _decode_wrapper(self):
        if self._decode is None:
            self._decode = self.fi.BatchDecodeWithPagedKVCacheWrapper(
                self._decode_ws, "NHD", use_tensor_cores=self.decode_tensor_cores
            )
        return self._decode

    def prepare(self, plan: StepPlan) -> CacheContext:
        if self.pool is None:
            raise RuntimeError("the FlashInfer pool is not allocated: call allocate(num_pages) first")
        self.run_copies(plan.copies)
        dev, ps = self.spec.device, self.page_size
        if not plan.seqs:
            return EmptyContext(torch.empty(0, dtype=torch.long, device=dev))
        if any(st.block_table is None for st in plan.seqs):
            raise ValueError("the flashinfer backend needs block tables: use it with a paged KV manager")
        decode = plan.is_decode
        skip = shared_prefix_pages(plan.seqs, ps) if self.cascade and decode else 0
        qo_indptr, kv_indptr, indices, last_len, batch_idx, kv_pos = [0], [0], [], [], [], []
        max_q = max_pages = 1
        for b, st in enumerate(plan.seqs):
            n = len(st.token_ids)
            if n > max_q:
                max_q = n
            end = st.start + n
            pages = -(-end // ps)
            max_pages = max(max_pages, pages - skip)
            indices.extend(st.block_table[skip:pages])
            kv_indptr.append(kv_indptr[-1] + pages - skip)
            qo_indptr.append(qo_indptr[-1] + n)
            last_len.append(end - (pages - 1) * ps)
            batch_idx.extend([b] * n)
            if skip:  # a decode step: one token, at its position among the sequence's own pages
                kv_pos.append(st.start - skip * ps)
        i32 = torch.int32
        # Pinned: FlashInfer's plan() copies them to the device, and from pageable memory that copy
        # waits for the step in flight (the host would lose its step ahead).
        qo_indptr_h, kv_indptr_h, last_len_h = pinned(qo_indptr, i32), pinned(kv_indptr, i32), pinned(last_len, i32)
        indices_d = to_device(indices, i32, dev)
        positions = positions_of(plan, dev)
        if skip:
            self.cascade_steps += 1
        split = leading_decode_rows(plan) if self.split_mixed and not decode else 0
        self.split_steps += bool(split)
        ctx = FlashInferContext(
            self,
            decode,
            (qo_indptr_h, kv_indptr_h, indices_d, last_len_h),
            self.pool,
            positions,
            to_device(batch_idx, i32, dev),
            to_device(kv_pos, i32, dev) if skip else positions.to(i32),
            indices_d,
            kv_indptr_h.to(dev, non_blocking=True),
            last_len_h.to(dev, non_blocking=True),
            shared=plan.seqs[0].block_table[:skip] if skip else None,
            max_q=max_q,
            max_pages=max_pages,
            fused=decode and not skip and len(plan.seqs) <= self.fused_rows,
            split=split,
            split_csr=_split_csr(split, qo_indptr, kv_indptr, indices_d, last_len) if split else (),
        )
        if self.num_qo_heads is not None and not ctx.fused:
            ctx.plan_once(self.num_qo_heads)
        return ctx

    def run_plan(self, wrapper, *args, **kwargs) -> None:
        """wrapper.plan(...), never while the copy of that wrapper's previous plan may still be queued.

        FlashInfer's plan() fills a pinned host buffer the wrapper owns and queues its copy to the
        device. With two steps in flight, a second plan could overwrite that buffer before the first
        copy ran (mini-sglang#103). An event after each plan makes the next one wait for it; in
        practice it has long fired (the copy opens the step after the one the host last collected)."""
        ev = self._plan_events.get(wrapper)
        if ev is not None and not ev.query():
            ev.synchronize()
        wrapper.plan(*args, **kwargs)
        if ev is None:
            ev = self._plan_events[wrapper] = torch.cuda.Event()
        ev.record()

    def plan_step(self, decode: bool, csr: tuple, num_qo_heads: int, max_q: int = 1):
        """Runs the wrapper's plan() for this step's page tables; returns the planned wrapper."""
        self.num_qo_heads = num_qo_heads
        qo_indptr_h, kv_indptr_h, indices_d, last_len_h = csr
        s, ps = self.spec, self.page_size
        common = dict(q_data_type=s.dtype, kv_data_type=s.cache_dtype, sm_scale=self.scale)
        if decode:
            wrapper = self._decode_wrapper()
            self.run_plan(
                wrapper, kv_indptr_h, indices_d, last_len_h, num_qo_heads, s.num_kv_heads, s.head_dim, ps, **common
            )
        else:
            wrapper = self._prefill
            # The longest query, given: plan() would find it with Python's max over a tensor's elements.
            self.run_plan(
                wrapper,
                qo_indptr_h,
                kv_indptr_h,
                indices_d,
                last_len_h,
                num_qo_heads,
                s.num_kv_heads,
                s.head_dim,
                ps,
                causal=True,
                max_token_per_sequence=max_q,
                **common,
            )
        return wrapper

    def plan_shared(self, batch: int, pages: list[int], num_qo_heads: int, wrapper=None):
        """Cascade level 0: all `batch` queries (one per sequence) against the shared pages, unmasked
        (the pages lie before every query). Returns the planned wrapper."""
        if wrapper is None:
            if self._shared is None:  # shares the prefill wrapper's workspace: never in the same step
                self._shared = self.fi.BatchPrefillWithPagedKVCacheWrapper(self._prefill_ws, "NHD", backend="fa2")
            wrapper = self._shared
        s, i32 = self.spec, torch.int32
        self.run_plan(
            wrapper,
            pinned([0, batch], i32),
            pinned([0, len(pages)], i32),
            to_device(pages, i32, s.device),
            pinned([self.page_size], i32),
            num_qo_heads,
            s.num_kv_heads,
            s.head_dim,
            self.page_size,
            causal=False,
            q_data_type=s.dtype,
            kv_data_type=s.cache_dtype,
            sm_scale=self.scale,
        )
        return wrapper


def _split_csr(d: int, qo_indptr: list, kv_indptr: list, indices: torch.Tensor, last_len: list) -> tuple:
    """The CSRs of a split mixed step: its first d rows (one token each), then the rest, re-based."""
    i32, at = torch.int32, kv_indptr[d]
    head = (None, pinned(kv_indptr[: d + 1], i32), indices[:at], pinned(last_len[:d], i32))
    qo, kv = [x - d for x in qo_indptr[d:]], [x - at for x in kv_indptr[d:]]
    return head, (pinned(qo, i32), pinned(kv, i32), indices[at:], pinned(last_len[d:], i32))
