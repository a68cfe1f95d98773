"""Cascade level 0 on its own: every query of a decode batch against one shared prefix, with
FlashInfer's split-KV on (its default) and off, in CUDA-graph mode as the decode graphs run it.

    python experiments/cascade_level0.py [batch] [shared_tokens]

Prints the kernel time per layer each way and the largest output difference between them.
"""

import inspect
import sys

import flashinfer
import torch

batch, shared = (int(a) for a in (sys.argv[1:] + ["256", "1024"][len(sys.argv) - 1 :])[:2])
hq, hkv, d, ps, dev, dt = 16, 8, 128, 16, "cuda", torch.bfloat16
pages = shared // ps
cache = torch.randn(pages + 1, 2, ps, hkv, d, dtype=dt, device=dev)
q = torch.randn(batch, hq, d, dtype=dt, device=dev)
i32 = torch.int32
print(
    "plan() takes disable_split_kv:",
    "disable_split_kv" in inspect.signature(flashinfer.BatchPrefillWithPagedKVCacheWrapper.plan).parameters,
)


def run(disable: bool):
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    bufs = [
        torch.zeros(2, dtype=i32, device=dev),
        torch.zeros(2, dtype=i32, device=dev),
        torch.zeros(pages, dtype=i32, device=dev),
        torch.zeros(1, dtype=i32, device=dev),
    ]
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
        ws,
        "NHD",
        use_cuda_graph=True,
        qo_indptr_buf=bufs[0],
        paged_kv_indptr_buf=bufs[1],
        paged_kv_indices_buf=bufs[2],
        paged_kv_last_page_len_buf=bufs[3],
        backend="fa2",
    )
    extra = {"disable_split_kv": True} if disable else {}
    w.plan(
        torch.tensor([0, batch], dtype=i32),
        torch.tensor([0, pages], dtype=i32),
        torch.arange(pages, dtype=i32, device=dev),
        torch.tensor([ps], dtype=i32),
        hq,
        hkv,
        d,
        ps,
        causal=False,
        q_data_type=dt,
        kv_data_type=dt,
        **extra,
    )
    out, lse = w.run(q, cache, return_lse=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, lse = w.run(q, cache, return_lse=True)
    for _ in range(10):
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(200):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 200 * 1e3, out.float(), lse


t_split, o1, l1 = run(False)
t_whole, o2, l2 = run(True)
print(
    f"batch {batch}, shared {shared} tokens: split-KV {t_split:.1f} us/layer, "
    f"no split {t_whole:.1f} us/layer; max |out| diff {(o1 - o2).abs().max().item():.4f}, "
    f"max |lse| diff {(l1 - l2).abs().max().item():.4f}"
)
