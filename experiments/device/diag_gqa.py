"""Kernel-level check: FlashInfer paged prefill (fa2, fa3, auto) and decode (with and without tensor
cores), and the SDPA backend's attend_one, against a float32 reference, for GQA groups 2 and 4."""
import math

import flashinfer
import torch

from nanoslg.cache.sdpa import attend_one

torch.manual_seed(0)
dev, bf16, D, ps = "cuda", torch.bfloat16, 128, 16
scale = D ** -0.5


def reference(q, k, v, start):
    n, hq, _ = q.shape
    g = hq // k.shape[1]
    kr, vr = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kr) * scale
    qpos = torch.arange(start, start + n, device=dev)[:, None]
    s = s.masked_fill(torch.arange(k.shape[0], device=dev)[None] > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), vr)


for hq, hkv in ((4, 2), (4, 1), (32, 8)):
    n = 300
    q = torch.randn(n, hq, D, dtype=bf16, device=dev)
    k = torch.randn(n, hkv, D, dtype=bf16, device=dev)
    v = torch.randn(n, hkv, D, dtype=bf16, device=dev)
    ref = reference(q, k, v, 0)
    pages = math.ceil(n / ps)
    pool = torch.zeros(pages, 2, ps, hkv, D, dtype=bf16, device=dev)
    pad = lambda x: torch.cat([x, x.new_zeros(pages * ps - n, hkv, D)]).view(pages, ps, hkv, D)  # noqa: E731
    pool[:, 0], pool[:, 1] = pad(k), pad(v)
    i32 = torch.int32
    qo = torch.tensor([0, n], dtype=i32)
    kvp = torch.tensor([0, pages], dtype=i32)
    idx = torch.arange(pages, dtype=i32, device=dev)
    last = torch.tensor([n - (pages - 1) * ps], dtype=i32)
    err = lambda o: (o.float() - ref[-o.shape[0]:]).abs().max().item()  # noqa: E731
    line = [f"Hq={hq} Hkv={hkv}: sdpa {err(attend_one(q, k, v, 0, scale)):.4f}"]
    for backend in ("fa2", "fa3", "auto"):
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=dev),
                                                           "NHD", backend=backend)
        w.plan(qo, kvp, idx, last, hq, hkv, D, ps, causal=True, q_data_type=bf16, kv_data_type=bf16,
               sm_scale=scale)
        line.append(f"prefill-{backend} {err(w.run(q, pool)):.4f}")
    for tc in (False, True):
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=dev),
                                                          "NHD", use_tensor_cores=tc)
        w.plan(kvp, idx, last, hq, hkv, D, ps, q_data_type=bf16, kv_data_type=bf16, sm_scale=scale)
        line.append(f"decode-tc={tc} {err(w.run(q[-1:].contiguous(), pool)):.4f}")
    print(" | ".join(line), flush=True)
