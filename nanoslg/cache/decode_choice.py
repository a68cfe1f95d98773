"""Which kernel runs the FlashInfer backend's decode steps (`cache.flashinfer_decode`), apart from XQA
(xqa_decode.py): FlashInfer's decode wrapper on tensor or CUDA cores, or, when asked for, our fused
Triton kernel for steps of a few rows. Plain functions of the config and the KV shape, so the CPU tests check them.
"""

from __future__ import annotations

from nanoslg.core.errors import ConfigError

FUSED_MAX_ROWS = 8  # a CUDA-graph bucket, so that a step and its bucket take the same kernel


def uses_tensor_cores(choice: str, group: int) -> bool:
    """Whether FlashInfer's decode wrapper runs its tensor-core kernel (its prefill kernel, one query
    row per sequence) rather than the CUDA-core decode kernel; choice is cache.flashinfer_decode. auto
    (and xqa and fused, whose other steps run the wrapper) keeps FlashInfer's rule, tensor cores from a
    GQA group of 4: at smaller groups the tensor-core kernel was no clear gain on W1 and its plan() adds
    host work every step (experiments/README.md, eighth wave)."""
    if choice in ("tensor_cores", "cuda_cores"):
        return choice == "tensor_cores"
    return group >= 4


def fused_unsupported(spec, fused_rope: bool) -> str | None:
    """Why the fused rotary + append + attention kernel (kernels/fused_decode.py) cannot run, or None."""
    if not fused_rope:
        return "it applies the rotary itself, and cache.fused_rope=off asks for FlashInfer's"
    if spec.cache_dtype != spec.dtype:
        return f"it reads a pool in the model's dtype, not {spec.cache_dtype} (an FP8 pool runs XQA or FlashInfer)"
    d = spec.head_dim
    if d & (d - 1) or not 32 <= d <= 256:
        return f"it takes a head_dim that is a power of two from 32 to 256, not {d}"
    return None


def fused_rows(spec, choice: str, fused_rope: bool) -> tuple[int, str]:
    """Decode steps of up to how many rows run the fused kernel (0: none), and what the log says of it.
    Only cache.flashinfer_decode=fused asks for it, and where it cannot run that is a ConfigError. auto
    leaves it off: on an H100 it was faster than FlashInfer's kernels only at contexts up to a few
    hundred tokens, and slower from about a thousand (experiments/README.md, seventeenth wave)."""
    if choice != "fused":
        return 0, ""
    why = fused_unsupported(spec, fused_rope)
    if why:
        raise ConfigError(f"cache.flashinfer_decode=fused cannot run here: {why}; use auto, tensor_cores or cuda_cores")
    return (
        FUSED_MAX_ROWS,
        f"; decode steps of up to {FUSED_MAX_ROWS} rows: rotary, KV append and attention in one Triton kernel",
    )
