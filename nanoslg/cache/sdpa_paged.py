"""The sdpa backend's decode rows through the Triton paged kernel (kernels/paged_decode.py), eager and in
CUDA graphs.

Eager steps pass each decode row's page table, key count and token row to the kernel. For graphs the
same three live in fixed buffers per backend, written before each replay; a padding row has no keys
(the kernel writes it zeros) and stores its K and V in a scratch page the backend never hands out.
Only the columns of the page table the step uses are copied, since max_model_len sets its width.
"""

from __future__ import annotations

import importlib.util
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from nanoslg.cache.backend import CacheContext
from nanoslg.cache.kv_quant import store
from nanoslg.core.plan import StepPlan
from nanoslg.core.tensors import to_device

MAX_SPLITS = 16
# Triton compiles a variant of a kernel for each integer argument's divisibility by 16 and each
# pointer's 16-byte alignment. Page tables are as wide as a multiple of this and every array starts
# 16-byte aligned, as the graphs' buffers are, so no eager step compiles a variant of its own.
ALIGN = 16


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def triton_status(device: torch.device, pool_dtype: torch.dtype, dtype: torch.dtype, head_dim: int) -> tuple[bool, str]:
    """Whether the paged kernel can run for this pool, and why not when it cannot."""
    if device.type != "cuda":
        return False, "no CUDA device"
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed"
    if pool_dtype != dtype:
        return False, f"the KV pool holds {pool_dtype}, not the model's {dtype}"
    if head_dim & (head_dim - 1) or head_dim < 16:
        return False, f"head_dim {head_dim} is not a power of two of at least 16"
    major, minor = torch.cuda.get_device_capability(device)
    if dtype == torch.bfloat16 and major < 8:
        return False, f"SM{major}{minor} has no bf16 tensor cores for Triton's tl.dot (model.dtype=float16 has)"
    import triton

    return True, f"triton {triton.__version__}"


def probe(spec) -> str | None:
    """Runs the kernel once on a few keys of the backend's shape; the error, if it fails to build or run
    (a Triton that cannot compile for this GPU), so that auto falls back instead of failing the first step."""
    from nanoslg.cache.kernels.paged_decode import paged_decode

    dev, d = spec.device, spec.head_dim
    hq = spec.num_qo_heads or spec.num_kv_heads
    try:
        kv = torch.zeros(16, spec.num_kv_heads, d, dtype=spec.dtype, device=dev)
        q, out = torch.zeros(2, 1, hq, d, dtype=spec.dtype, device=dev)
        one = torch.ones(1, dtype=torch.long, device=dev)
        paged_decode(q, kv, kv, torch.zeros(1, 1, dtype=torch.long, device=dev), one, one - 1, out, 1.0, 16, 1)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except Exception as e:  # a compiler or driver error: any type
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


def num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Splits per row: enough programs to fill the GPU about twice when the batch alone does not.
    Counted for the batch rounded up to a power of two, which a CUDA-graph bucket holding the batch
    rounds to as well: an eager step and its replay split alike, so they give the same bits."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    want = math.ceil(2 * sms / (kv_heads << (max(1, batch) - 1).bit_length()))
    return min(MAX_SPLITS, 1 << (want - 1).bit_length())  # a power of two: the merge kernel's tl.arange


@dataclass(eq=False)
class PagedDecode:
    """A step's decode rows for the kernel: [B, pages] page ids, [B] key counts, [B] token rows."""

    table: torch.Tensor
    lens: torch.Tensor
    rows: torch.Tensor
    splits: int
    page_size: int

    def run(self, q, kc, vc, out, scale: float) -> None:
        from nanoslg.cache.kernels.paged_decode import paged_decode  # Triton only once this kernel runs

        paged_decode(q, kc, vc, self.table, self.lens, self.rows, out, scale, self.page_size, self.splits)


def decode_arrays(decodes: list[tuple[int, int, list[int]]], page_size: int) -> list[np.ndarray]:
    """Host arrays for PagedDecode from (row, key count, pages) per decode row: rows and lens as one
    array, each half padded to an even count (so lens, too, starts on 16 bytes), then the page table
    [B, pages] flattened."""
    n = len(decodes)
    half = n + n % 2
    width = aligned(max((-(-end // page_size) for _, end, _ in decodes), default=0))
    table = np.zeros((n, width), dtype=np.int64)
    rows_lens = np.zeros(2 * half, dtype=np.int64)
    for i, (row, end, pages) in enumerate(decodes):
        used = -(-end // page_size)
        table[i, :used] = pages[:used]
        rows_lens[i], rows_lens[half + i] = row, end
    return [rows_lens, table.ravel()]


def paged_from(rows_lens: torch.Tensor, flat_table: torch.Tensor, n: int, kv_heads: int, page_size: int) -> PagedDecode:
    """The PagedDecode of n decode rows from decode_arrays' two arrays, on the device."""
    half = rows_lens.numel() // 2
    rows, lens = rows_lens[:n], rows_lens[half : half + n]
    return PagedDecode(flat_table.view(n, -1), lens, rows, num_splits(n, kv_heads, flat_table.device), page_size)


class _GraphContext(CacheContext):
    def __init__(self, g: SdpaGraphs, bs: int):
        self.g, self.bs = g, bs
        self.positions = g.positions[:bs]
        splits = num_splits(bs, g.kv_heads, g.device)
        self.decode = PagedDecode(g.table[:bs], g.lens[:bs], g.rows[:bs], splits, g.backend.page_size)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b = self.g.backend
        kc, vc = b.pool[layer, 0], b.pool[layer, 1]
        store(kc, vc, self.g.new_slots[: self.bs], k, v, b.spec.scales(layer))
        out = torch.empty_like(q)
        self.decode.run(q, kc, vc, out, b.scale)
        return out


class SdpaGraphs:
    """Fixed buffers for the sdpa backend's captured decode steps."""

    def __init__(self, backend, max_bs: int, max_model_len: int):
        self.backend = weakref.proxy(backend)  # the backend owns this; no cycle to outlive the engine
        s = backend.spec
        self.device, self.kv_heads, i64 = s.device, s.num_kv_heads, torch.long
        self.positions = torch.zeros(max_bs, dtype=i64, device=s.device)
        self.new_slots = torch.full((max_bs,), backend.scratch_page * backend.page_size, dtype=i64, device=s.device)
        self.lens = torch.zeros(max_bs, dtype=i64, device=s.device)
        self.rows = torch.arange(max_bs, dtype=i64, device=s.device)
        self.table = torch.zeros(max_bs, aligned(-(-max_model_len // backend.page_size)), dtype=i64, device=s.device)

    def capture_context(self, bs: int) -> CacheContext:
        return _GraphContext(self, bs)

    def prepare_replay(self, bs: int, plan: StepPlan) -> None:
        b, ps = self.backend, self.backend.page_size
        b.free_pages(plan.freed)
        n = len(plan.seqs)
        decodes, slots = [], np.full(bs, b.scratch_page * ps, dtype=np.int64)
        for i, st in enumerate(plan.seqs):
            pages = b.pages_of(st.seq_id, st.start + 1)
            slots[i] = pages[st.start // ps] * ps + st.start % ps
            decodes.append((i, st.start + 1, pages))
        rows_lens, table = decode_arrays(decodes, ps)
        lens = np.zeros(bs, dtype=np.int64)
        lens[:n] = rows_lens[rows_lens.size // 2 :][:n]
        positions = np.zeros(bs, dtype=np.int64)
        positions[:n] = lens[:n] - 1
        dev = to_device(np.concatenate([positions, slots, lens, table]), torch.long, self.device)
        self.positions[:bs].copy_(dev[:bs])
        self.new_slots[:bs].copy_(dev[bs : 2 * bs])
        self.lens[:bs].copy_(dev[2 * bs : 3 * bs])
        width = table.size // n
        self.table[:n, :width].copy_(dev[3 * bs :].view(n, width))
