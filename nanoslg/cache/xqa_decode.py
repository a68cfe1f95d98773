"""FlashInfer's XQA decode kernel (`cache.flashinfer_decode=xqa`): TensorRT-LLM's GQA decode attention.

Why: with an FP8 pool, FlashInfer's CUDA-core and tensor-core decode kernels convert every K and V
value to bf16 before their products, and that conversion, not reading the bytes, bounds them
(experiments/README.md, eighth wave). On SM90 with an FP8 pool, XQA instead casts q and the softmax
weights to FP8 and runs both products on FP8 tensor cores (wgmma), as TensorRT-LLM runs an FP8 KV
cache. So its numbers differ from the upcasting kernels: q and the probabilities are rounded to FP8.
With a pool in the model's dtype it runs its bf16/fp16 kernel.

XQA needs no plan(): it takes each row's pages as one row of a dense table and its KV length, which
kernels/page_table.py builds on the device from the CSR the host writes anyway (for the KV append).
Cascade steps (XQA returns no log-sum-exp to merge) and steps with prefill rows keep FlashInfer's
wrappers.
"""

from __future__ import annotations

import torch

from nanoslg.cache.kv_quant import is_fp8
from nanoslg.core.errors import ConfigError

# Semaphores (the first 8 MiB, zero before the first launch; the kernel leaves them zero) and the
# partial results of sequences split over several blocks (a few sequences a step only).
WORKSPACE_BYTES = 64 << 20
PAGE_SIZES = (16, 32, 64, 128)


def xqa_choice(fi, spec, page_size: int, num_qo_heads: int, choice: str, wrapper_kind: str) -> str | None:
    """Whether decode steps run XQA (choice is cache.flashinfer_decode): what the start-up log says of
    it, or None for FlashInfer's wrapper. auto takes XQA for an FP8 pool on SM90, where it was measured
    faster (experiments/README.md, twelfth wave); with a bf16 pool at batch 1 it was slower. An explicit
    xqa where it cannot run is a ConfigError."""
    if choice not in ("auto", "xqa"):
        return None
    why = xqa_unsupported(fi, spec, page_size, num_qo_heads)
    if choice == "auto":
        sm90 = torch.cuda.get_device_capability(spec.device)[0] == 9
        if why or not (sm90 and is_fp8(spec.cache_dtype)):
            return None
    elif why:
        raise ConfigError(f"cache.flashinfer_decode=xqa cannot run here: {why}; use auto, tensor_cores or cuda_cores")
    how = "q and the softmax weights rounded to FP8, FP8 products" if is_fp8(spec.cache_dtype) else str(spec.dtype)
    why_auto = ", auto: an FP8 pool on SM90" if choice == "auto" else ""
    return f"XQA ({how}{why_auto}; cascade steps: the {wrapper_kind} kernel)"


def xqa_unsupported(fi, spec, page_size: int, num_qo_heads: int) -> str | None:
    """Why XQA cannot run this model's attention here, or None."""
    if not hasattr(getattr(fi, "decode", None), "xqa_batch_decode_with_kv_cache"):
        return f"flashinfer {getattr(fi, '__version__', '?')} has no decode.xqa_batch_decode_with_kv_cache"
    major = torch.cuda.get_device_capability(spec.device)[0]
    if major not in (9, 10, 12):
        return f"XQA runs on SM90, SM100 and SM120 GPUs, this one is SM{major}x"
    if page_size not in PAGE_SIZES:
        return f"XQA takes cache.page_size in {PAGE_SIZES}, not {page_size}"
    if spec.head_dim % 16 or not 16 <= spec.head_dim <= 256:
        return f"XQA takes a head_dim that is a multiple of 16 up to 256, not {spec.head_dim}"
    if spec.dtype not in (torch.bfloat16, torch.float16):
        return f"XQA runs bfloat16 or float16 queries, not {spec.dtype}"
    if num_qo_heads % spec.num_kv_heads:
        return f"{num_qo_heads} query heads do not split into {spec.num_kv_heads} KV heads"
    return None


class XqaDecode:
    """The device buffers of XQA decode steps of up to `rows` sequences: the dense page table, the KV
    lengths and the kernel's workspace. One instance serves the CUDA graphs (fixed buffers), another
    the eager decode steps (`workspace`: an earlier instance's, whose semaphores the kernel left zero)."""

    def __init__(self, fi, spec, page_size: int, scale: float, rows: int, max_pages: int, workspace=None):
        dev = spec.device
        self.run_kernel = fi.decode.xqa_batch_decode_with_kv_cache
        self.page_size, self.scale = page_size, scale
        self.table = torch.zeros(rows, max_pages, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, device=dev)  # read as uint32 by the kernel
        if workspace is None:
            workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        self.workspace = workspace

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    def fill(self, indptr: torch.Tensor, indices: torch.Tensor, last_len: torch.Tensor) -> XqaStep:
        """Writes the step's table rows and KV lengths (one kernel) from the CSR on the device; returns
        what run_attention calls for the step's len(indptr) - 1 rows."""
        from nanoslg.cache.kernels.page_table import csr_to_table  # deferred: imports Triton

        csr_to_table(indptr, indices, last_len, self.table, self.seq_lens, self.page_size)
        return XqaStep(self, indptr.shape[0] - 1)


class XqaStep:
    """One step's XQA attention over `bs` rows, called like a planned FlashInfer wrapper."""

    def __init__(self, xqa: XqaDecode, bs: int):
        self.xqa, self.bs = xqa, bs

    def run(self, q: torch.Tensor, cache: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0, return_lse=False):
        if return_lse:
            raise ValueError("XQA returns no log-sum-exp: cascade steps run FlashInfer's decode wrapper")
        x, bs = self.xqa, self.bs
        out = torch.empty_like(q)
        x.run_kernel(
            q,
            cache,
            x.workspace,
            x.table[:bs],
            x.seq_lens[:bs],
            x.table.shape[1] * x.page_size,
            bmm1_scale=x.scale * k_scale,
            bmm2_scale=v_scale,
            out=out,
        )
        return out
