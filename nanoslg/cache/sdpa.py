"""The SDPA backend: torch's scaled_dot_product_attention over a page pool private to the backend.

It runs everywhere torch runs (the CPU path of CI, and GPUs without FlashInfer). The pool is one
tensor [layers, 2, pages * page_size, Hkv, D]; this backend hands out its pages itself (its manager,
the rank-0 TokenBudgetManager, only counts them and keeps the sum of pages_for(kv_tokens) over
running sequences within the pool). Token slots (page * page_size + offset) are computed once per
step in `prepare`. Decode rows attend in a few batched calls (sdpa_decode.py), or on a GPU with Triton
in one paged kernel that reads the pool in place (sdpa_paged.py; `cache.sdpa_decode`), which also lets
decode steps run in CUDA graphs. Prefill chunks attend one sequence at a time, where the flash kernels
with is_causal do the work.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nanoslg.cache.backend import CacheBackend, CacheContext, KVSpec, positions_of
from nanoslg.cache.kv_quant import as_bytes, gather, store
from nanoslg.cache.sdpa_decode import DecodeGroup, attend_group, build_group, decode_kernels, plan_groups
from nanoslg.cache.sdpa_paged import PagedDecode, SdpaGraphs, decode_arrays, paged_from, probe, triton_status
from nanoslg.core.config import CacheConfig
from nanoslg.core.errors import ConfigError
from nanoslg.core.plan import StepPlan
from nanoslg.core.registry import CACHE_BACKENDS
from nanoslg.core.tensors import to_device

# On the CPU the pool starts this small and doubles as pages are handed out (lowest ids first, so it
# stays compact): the CPU budget (cache.cpu_kv_gib) is an upper bound, not memory to take up front.
CPU_FIRST_PAGES = 64


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
class _Chunk:
    """A row of more than one token (a prefill chunk)."""

    start: int
    n: int
    offset: int  # first row of this sequence in the step's flattened tokens
    slots: torch.Tensor  # pool slots of positions 0..start+n-1


@dataclass(eq=False)
class SdpaContext(CacheContext):
    pool: torch.Tensor
    new_slots: torch.Tensor  # [T] where each of the step's tokens is stored
    groups: list[DecodeGroup]
    chunks: list[_Chunk]
    positions: torch.Tensor
    scale: float
    spec: KVSpec
    kernels: list | None = None  # the batched decode call's SDPA kernels (sdpa_decode.decode_kernels)
    paged: PagedDecode | None = None  # the decode rows, for the Triton kernel (in place of groups)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.pool[layer, 0], self.pool[layer, 1]  # [slots, Hkv, D], views
        scales = self.spec.scales(layer)
        # All new KV is written first, then read back: an FP8 pool stores x / scale (kv_quant.py).
        store(kc, vc, self.new_slots, k, v, scales)

        def read(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return gather(kc, vc, slots, scales, q.dtype)

        hkv = self.spec.num_kv_heads
        if self.paged is not None:
            out = torch.empty_like(q)
            self.paged.run(q, kc, vc, out, self.scale)
        elif len(self.groups) == 1 and self.groups[0].rows is None:  # a plain decode step
            return attend_group(q, self.groups[0], read, hkv, self.scale, self.kernels)
        else:
            out = torch.empty_like(q)
        for g in self.groups:
            out.index_copy_(0, g.rows, attend_group(q, g, read, hkv, self.scale, self.kernels))
        as_stored = kc.dtype == k.dtype  # else the pool rounds (FP8): attend what it holds
        for c in self.chunks:
            rows = slice(c.offset, c.offset + c.n)
            # A whole prompt's keys are the step's own: no need to read them back from the pool.
            kv = (k[rows], v[rows]) if c.start == 0 and as_stored else read(c.slots)
            out[rows] = attend_one(q[rows], *kv, c.start, self.scale)
        return out


@CACHE_BACKENDS.register("sdpa")
class SdpaBackend(CacheBackend):
    name = "sdpa"

    def __init__(self, spec: KVSpec, page_size: int):
        super().__init__(spec, page_size)
        self.pool: torch.Tensor | None = None
        self.num_pages = 0
        self.free: list[int] = []  # a heap: the lowest page ids go out first
        self.pages: dict[int, list[int]] = {}  # seq id -> its pages, in order
        self.top = 0  # one past the highest page id handed out so far
        group = spec.num_qo_heads // spec.num_kv_heads if spec.num_qo_heads else 1
        self.kernels = decode_kernels(spec.num_kv_heads, group, spec.head_dim, spec.dtype, spec.device)
        # What one key's K and V take once gathered (read back in the model's dtype): bounds a group's copy.
        self.gathered_token_bytes = 2 * spec.num_kv_heads * spec.head_dim * spec.dtype.itemsize
        self.triton = False  # decode rows through the paged Triton kernel (configure)
        self._graphs: SdpaGraphs | None = None

    def configure(self, cache_cfg: CacheConfig) -> str:
        choice = cache_cfg.sdpa_decode
        s = self.spec
        ok, why = triton_status(s.device, s.cache_dtype, s.dtype, s.head_dim)
        if choice == "triton" and not ok:
            raise ConfigError(f"cache.sdpa_decode=triton cannot run here: {why}; use auto or gather")
        if ok and choice == "auto":
            failed = probe(s)
            ok, why = (False, f"the kernel failed its probe ({failed})") if failed else (ok, why)
        self.triton = ok and choice != "gather"
        self.supports_graphs = self.triton  # the gathered decode's shapes change every step
        if self.triton:
            return f"decode attention in the paged Triton kernel ({why}; cache.sdpa_decode={choice})"
        reason = "set by cache.sdpa_decode=gather" if choice == "gather" else f"no Triton kernel: {why}"
        return f"decode attention gathered into batched SDPA calls ({reason})"

    @property
    def scratch_page(self) -> int:
        """A page past the budget, never handed out: graph padding rows write their K and V there."""
        return self.num_pages

    @property
    def _most_pages(self) -> int:
        """The pool's largest size: the budget, and on a GPU (where graphs run) the scratch page."""
        return self.num_pages + (self.spec.device.type == "cuda")

    def allocate(self, num_pages: int) -> None:
        self.num_pages, self.pool, self.top = num_pages, None, 0
        self.free, self.pages = list(range(num_pages)), {}  # a sorted list is a heap
        # On a GPU the whole pool at once: the memory was sized for it, and growing would copy it.
        self._reserve(self._most_pages if self.spec.device.type == "cuda" else min(num_pages, CPU_FIRST_PAGES))

    def _reserve(self, pages: int) -> None:
        """Makes the pool hold at least `pages` pages (at least doubling it)."""
        have = 0 if self.pool is None else self.pool.shape[2] // self.page_size
        if pages <= have:
            return
        pages = min(self._most_pages, max(pages, 2 * have))
        s = self.spec
        shape = (s.num_layers, 2, pages * self.page_size, s.num_kv_heads, s.head_dim)
        pool = torch.zeros(shape, dtype=s.cache_dtype, device=s.device)
        if self.pool is not None:
            as_bytes(pool)[:, :, : self.pool.shape[2]] = as_bytes(self.pool)
        self.pool = pool

    def free_pages(self, freed) -> None:
        for seq_id in freed:
            for page in self.pages.pop(seq_id, ()):
                heapq.heappush(self.free, page)

    def pages_of(self, seq_id: int, num_tokens: int) -> list[int]:
        """The sequence's pages, grown to hold num_tokens."""
        pages = self.pages.setdefault(seq_id, [])
        for _ in range(-(-num_tokens // self.page_size) - len(pages)):
            if not self.free:
                raise RuntimeError(f"the sdpa KV pool ({self.num_pages} pages) is exhausted: the budget was exceeded")
            page = heapq.heappop(self.free)
            self.top = max(self.top, page + 1)
            pages.append(page)
        return pages

    def prepare(self, plan: StepPlan) -> SdpaContext:
        if self.pool is None:
            raise RuntimeError("the sdpa pool is not allocated: call allocate(num_pages) first")
        self.free_pages(plan.freed)
        ps, new_slots, decodes, chunks, offset = self.page_size, [], [], [], 0
        for st in plan.seqs:
            n = len(st.token_ids)
            end = st.start + n
            pages = self.pages_of(st.seq_id, end)
            if n == 1:
                new_slots.append(pages[st.start // ps] * ps + st.start % ps)
                decodes.append((offset, end, pages))
            else:
                pos = np.arange(end)
                slots = np.asarray(pages, dtype=np.int64)[pos // ps] * ps + pos % ps
                new_slots.extend(slots[st.start :].tolist())
                chunks.append((st.start, n, offset, slots))
            offset += n
        self._reserve(self.top)
        s = self.spec
        groups = [] if self.triton else plan_groups(decodes, self.gathered_token_bytes, ps)
        # Everything the step's layers read goes to the device in one copy, sliced there.
        parts = [np.asarray(new_slots, dtype=np.int64)]
        if self.triton and decodes:
            parts += decode_arrays(decodes, ps)
        parts += [a for g in groups for a in (np.asarray(g.rows + g.lens, dtype=np.int64), g.table.ravel())]
        parts += [c[3] for c in chunks]
        # Each part padded to 16 bytes, so every piece starts aligned (sdpa_paged.ALIGN says why).
        sizes = [p.size for p in parts]
        flat = to_device(np.concatenate([np.pad(p, (0, p.size % 2)) for p in parts]), torch.long, s.device)
        pieces = iter(t[:n] for t, n in zip(torch.split(flat, [n + n % 2 for n in sizes]), sizes))
        new = next(pieces)
        paged = None
        if self.triton and decodes:
            paged = paged_from(next(pieces), next(pieces), len(decodes), s.num_kv_heads, ps)
        whole = len(groups) == 1 and len(decodes) == offset  # every row a decode, in order
        built = []
        for g in groups:
            rows_lens, table = next(pieces), next(pieces).view(len(g.rows), -1)
            rows, lens = rows_lens.split(len(g.rows))
            built.append(build_group(None if whole else rows, lens, table, g.width, ps, s.dtype))
        done = [_Chunk(start, n, off, next(pieces)) for start, n, off, _ in chunks]
        positions = positions_of(plan, s.device)
        return SdpaContext(self.pool, new, built, done, positions, self.scale, s, self.kernels, paged)

    # -- CUDA graphs (the Triton decode only) ---------------------------------------------------
    def init_graphs(self, max_bs: int, max_model_len: int) -> None:
        self._graphs = SdpaGraphs(self, max_bs, max_model_len)

    def capture_context(self, bs: int, variant: str) -> CacheContext:
        return self._graphs.capture_context(bs)

    def prepare_replay(self, bs: int, plan: StepPlan) -> str:
        self._graphs.prepare_replay(bs, plan)
        return "plain"


class NoCacheContext(CacheContext):
    """Attention over the step's own tokens as one causal sequence, storing nothing (memory profiling)."""

    def __init__(self, positions: torch.Tensor, scale: float):
        self.positions = positions
        self.scale = scale

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend_one(q, k, v, 0, self.scale)
