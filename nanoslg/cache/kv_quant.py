"""An FP8 KV cache (`cache.kv_dtype=fp8_e4m3`): what every backend does to store and read K and V.

The pool holds float8_e4m3fn, one byte per value, so the same memory holds twice the tokens of a
bf16 pool. A value is stored as x / scale, saturated to the format's range, and read back as
stored * scale; the scale is per layer and per K or V, taken from the checkpoint where it has them
(`self_attn.k_scale` / `v_scale`), else 1.0 as vLLM does. FlashInfer applies the scales inside its
kernels (`k_scale` / `v_scale`); the torch backends upcast what they read.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
KV_DTYPES = {"auto": None, "fp8_e4m3": FP8}


def resolve_kv_dtype(name: str) -> torch.dtype | None:
    """cache.kv_dtype -> the pool's dtype, or None for the model's own."""
    return KV_DTYPES[name]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8


def to_cache(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x in the pool's dtype: divided by the scale and saturated (a plain cast would make NaN of
    anything past the largest float8 on the GPU)."""
    if not is_fp8(dtype):
        return x.to(dtype)
    if scale != 1.0:
        x = x.float() / scale
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def to_cache_pair(k: torch.Tensor, v: torch.Tensor, scales, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """to_cache of k and v [T, Hkv, D]. Where v directly follows k in memory (both views of one fused
    qkv output) and no scale applies, both are converted as one view: two kernels, not four."""
    ks, vs = scales
    t, h, d = k.shape
    joined = (
        ks == 1.0
        and vs == 1.0
        and is_fp8(dtype)
        and k.dtype == v.dtype
        and v.shape == k.shape
        and k.stride() == v.stride() == (k.stride(0), d, 1)
        and v.data_ptr() == k.data_ptr() + h * d * k.element_size()
    )
    if not joined:
        return to_cache(k, ks, dtype), to_cache(v, vs, dtype)
    kv = to_cache(k.as_strided((t, 2 * h, d), (k.stride(0), d, 1)), 1.0, dtype)
    return kv[:, :h], kv[:, h:]


def from_cache(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Values read from the pool, in the model's dtype."""
    if not is_fp8(x.dtype):
        return x
    y = x.to(dtype)
    return y if scale == 1.0 else y * scale


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """A uint8 view of a one-byte tensor: torch's CPU index_copy_ has no float8 kernel."""
    return x.view(torch.uint8) if is_fp8(x.dtype) else x


def store(kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales) -> None:
    """Writes a step's new K and V [T, Hkv, D] at `slots` of one layer's pool, kc and vc [slots, Hkv, D]."""
    ks, vs = scales
    as_bytes(kc).index_copy_(0, slots, as_bytes(to_cache(k, ks, kc.dtype)))
    as_bytes(vc).index_copy_(0, slots, as_bytes(to_cache(v, vs, vc.dtype)))


def gather(kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor, scales, dtype: torch.dtype):
    """(K, V) at `slots` of one layer's pool, in `dtype` (an FP8 pool upcast, its scales applied)."""
    ks, vs = scales
    k = as_bytes(kc).index_select(0, slots).view(kc.dtype)  # as bytes: indexing kernels may lack float8
    v = as_bytes(vc).index_select(0, slots).view(vc.dtype)
    return from_cache(k, ks, dtype), from_cache(v, vs, dtype)
