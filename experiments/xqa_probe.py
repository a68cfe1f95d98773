"""FlashInfer's XQA decode kernel against its CUDA-core and tensor-core decode wrappers, at W1's and
W3's shapes, bf16 and FP8 KV: error against a float32 reference and kernel time (CUDA events).

    python experiments/xqa_probe.py            # on an SM90 GPU; builds the XQA modules (JIT) first
"""

from __future__ import annotations

import time

import torch

DEV = "cuda"


def reference(q, cache, tables, lens, scale):
    """float32 attention of each row over its pages (the pool as stored, upcast)."""
    out = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        pages = tables[b, : -(-n // cache.shape[2])].long()
        kv = cache[pages].float()  # [p, 2, ps, H, D]
        k = kv[:, 0].reshape(-1, kv.shape[3], kv.shape[4])[:n]
        v = kv[:, 1].reshape(-1, kv.shape[3], kv.shape[4])[:n]
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v))
    return torch.stack(out)


def timed(fn, iters=50):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def case(hq, hkv, bs, mean_len, kv_dtype, ps=16, d=128):
    import flashinfer
    from flashinfer.decode import xqa_batch_decode_with_kv_cache

    g = torch.Generator(device="cpu").manual_seed(0)
    lens = torch.randint(mean_len // 2, mean_len * 3 // 2, (bs,), generator=g)
    pages = (-(-lens // ps)).tolist()
    total = sum(pages)
    perm = torch.randperm(total, generator=g).int()
    maxp = max(pages)
    tables = torch.zeros(bs, maxp, dtype=torch.int32)
    at = 0
    for b, p in enumerate(pages):
        tables[b, :p] = perm[at : at + p]
        at += p
    cache = (torch.randn(total, 2, ps, hkv, d, device=DEV) * 0.5).to(kv_dtype)
    q = torch.randn(bs, hq, d, device=DEV, dtype=torch.bfloat16)
    scale = d**-0.5
    tables_d, lens_d = tables.to(DEV), lens.to(DEV, torch.int32)
    indptr = torch.tensor([0] + pages, dtype=torch.int32).cumsum(0).int()
    indices = torch.cat([tables[b, :p] for b, p in enumerate(pages)]).to(DEV)
    last = (lens - (torch.tensor(pages) - 1) * ps).int()
    ref = reference(q, cache, tables_d, lens, scale)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=DEV)
    rows = []
    for name, tc in (("cuda-core", False), ("tensor-core", True)):
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
        w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=torch.bfloat16, kv_data_type=kv_dtype, sm_scale=scale)
        out = w.run(q, cache)
        rows.append((name, (out.float() - ref).abs().max().item(), timed(lambda w=w: w.run(q, cache))))
    xws = torch.zeros(256 << 20, dtype=torch.uint8, device=DEV)
    out = torch.empty_like(q)

    def xqa():
        xqa_batch_decode_with_kv_cache(q, cache, xws, tables_d, lens_d, maxp * ps, bmm1_scale=scale, out=out)

    t0 = time.perf_counter()
    xqa()
    torch.cuda.synchronize()
    built = time.perf_counter() - t0
    rows.append(("xqa", (out.float() - ref).abs().max().item(), timed(xqa)))
    kv_bytes = sum(lens.tolist()) * 2 * hkv * d * cache.element_size()
    print(f"Hq={hq} Hkv={hkv} bs={bs} mean_len={mean_len} kv={kv_dtype} (xqa first call {built:.1f} s)")
    for name, err, ms in rows:
        print(f"  {name:12s} max|err| {err:.4f}  {ms * 1000:8.1f} us  {kv_bytes / ms / 1e9:7.2f} TB/s")


def main():
    for kv in (torch.float8_e4m3fn, torch.bfloat16):
        case(16, 8, 256, 1100, kv)  # W1 (Qwen3-0.6B) mid-run
        case(32, 8, 1, 600, kv)  # W3 / W10 (Llama-8B) batch 1
        case(32, 8, 200, 1000, kv)  # W2 (Llama-8B) mid-run


if __name__ == "__main__":
    main()
