"""Batch-1 decode attention at Llama-8B's shape (32 query heads, 8 KV heads, head_dim 128, bf16 pool):
FlashInfer's CUDA-core and tensor-core decode wrappers with and without split-KV (the split adds a
merge kernel), and XQA, timed as a CUDA graph of 32 back-to-back calls (a step's layers), so the
time is the kernels' and not the launches'. W3 and W10 decode at contexts of 128-384 tokens.

    python experiments/attn_b1_probe.py            # on a GPU with flashinfer
"""

from __future__ import annotations

import torch

DEV = "cuda"
LAYERS = 32


def graph_time(fn, reps=20) -> float:
    """us per call: LAYERS calls captured in one graph, replayed reps times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(LAYERS):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / reps / LAYERS


def case(ctx: int, hq=32, hkv=8, d=128, ps=16, dtype=torch.bfloat16) -> None:
    import flashinfer

    pages = -(-ctx // ps)
    cache = (torch.randn(pages, 2, ps, hkv, d, device=DEV) * 0.5).to(dtype)
    q = torch.randn(1, hq, d, device=DEV, dtype=torch.bfloat16)
    indptr = torch.tensor([0, pages], dtype=torch.int32)
    indices = torch.arange(pages, dtype=torch.int32, device=DEV)
    last = torch.tensor([ctx - (pages - 1) * ps], dtype=torch.int32)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=DEV)
    rows, ref = [], None
    for tc in (False, True):
        for no_split in (False, True):
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
            try:
                w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=torch.bfloat16, kv_data_type=dtype,
                       sm_scale=d**-0.5, disable_split_kv=no_split)  # fmt: skip
                out = w.run(q, cache)
                ref = out if ref is None else ref
                us = graph_time(lambda w=w: w.run(q, cache))
                rows.append((f"{'tensor' if tc else 'cuda'}-core split={'off' if no_split else 'on'}", us,
                             (out.float() - ref.float()).abs().max().item(), torch.equal(out, ref)))  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a probe: print what failed and go on
                rows.append(
                    (f"{'tensor' if tc else 'cuda'}-core split={'off' if no_split else 'on'}: {e!r}"[:160], 0, 0, 0)
                )
    try:
        from flashinfer.decode import xqa_batch_decode_with_kv_cache

        xws = torch.zeros(256 << 20, dtype=torch.uint8, device=DEV)
        table = indices.view(1, -1)
        lens = torch.tensor([ctx], dtype=torch.int32, device=DEV)
        out = torch.empty_like(q)

        def xqa():
            xqa_batch_decode_with_kv_cache(q, cache, xws, table, lens, pages * ps, bmm1_scale=d**-0.5, out=out)

        xqa()
        rows.append(("xqa", graph_time(xqa), (out.float() - ref.float()).abs().max().item(), torch.equal(out, ref)))
    except Exception as e:  # noqa: BLE001
        rows.append((f"xqa: {e!r}"[:160], 0, 0, 0))
    print(f"batch 1, context {ctx}, {dtype}: us a layer ({LAYERS} calls in a graph), max|diff|, same bits as the first")
    for name, us, diff, same in rows:
        print(f"  {name:28s} {us:7.2f} us  {diff:.2e}  {same}")


def fused_case(batch: int, ctx: int, hq=32, hkv=8, d=128, ps=16) -> None:
    """The fused decode kernel (rotary + append + attention, kernels/fused_decode.py) against what it
    replaces: our rotary + append kernel, then FlashInfer's tensor-core decode wrapper (split-KV on)."""
    import flashinfer

    from nanoslg.cache.kernels.fused_decode import FusedDecode
    from nanoslg.cache.kernels.rope_append import rope_append
    from nanoslg.model.layers import RotaryEmbedding

    pages = -(-ctx // ps)
    pool = (torch.randn(batch * pages, 2, ps, hkv, d, device=DEV) * 0.5).to(torch.bfloat16)
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, device=DEV, dtype=torch.bfloat16)
    q, k, v = (x.view(batch, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], -1))
    i32 = dict(dtype=torch.int32, device=DEV)
    indptr = torch.arange(batch + 1, **i32) * pages
    indices = torch.arange(batch * pages, **i32)
    kv_pos = torch.full((batch,), ctx - 1, **i32)
    positions = kv_pos.long()
    cos_sin = RotaryEmbedding(d, 8192, 500000.0, None).cos_sin_cache.to(DEV)
    bidx = torch.arange(batch, **i32)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=DEV)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    last = torch.full((batch,), ctx - (pages - 1) * ps, dtype=torch.int32)
    w.plan(indptr.cpu(), indices, last, hq, hkv, d, ps, q_data_type=torch.bfloat16, sm_scale=d**-0.5)
    qr = torch.empty(q.shape, dtype=q.dtype, device=DEV)

    def unfused():
        rope_append(q, k, v, positions, cos_sin, pool, bidx, kv_pos, indices, indptr, qr)
        return w.run(qr, pool)

    scratch = FusedDecode(8, hq, hkv, d, DEV)

    def fused():
        return scratch.run(q, k, v, positions, cos_sin, pool, kv_pos, indices, indptr, d**-0.5)

    diff = (fused().float() - unfused().float()).abs().max().item()
    a, b = graph_time(unfused), graph_time(fused)
    print(f"batch {batch}, context {ctx}: rope_append + tensor-core decode {a:6.2f} us, fused {b:6.2f} us a layer, "
          f"max|diff| {diff:.2e}")  # fmt: skip


def main() -> None:
    for batch in (1, 4, 8):
        for ctx in (128, 384, 1024, 4096):
            fused_case(batch, ctx)
    for ctx in (128, 256, 384, 1024, 4096):
        case(ctx)
    for ctx in (256, 1024):
        case(ctx, dtype=torch.float8_e4m3fn)


if __name__ == "__main__":
    main()
