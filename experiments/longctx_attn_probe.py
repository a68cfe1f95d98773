"""W9's prefill attention at Llama-8B's shape (32 query heads, 8 KV heads, head_dim 128, bf16): one
sequence's 8,192-token chunk after 0-24k cached tokens, through FlashInfer's paged prefill (FA3 and
FA2 mainloops, as the engine runs it) and its ragged prefill over the same keys made contiguous (the
gather of the cached pages timed on its own), in TFLOP/s of causal attention; then a mixed step's
chunk with decode rows of long contexts, in one prefill call against the two kinds of rows apart.

    python experiments/longctx_attn_probe.py            # on an SM90 GPU with flashinfer
"""

from __future__ import annotations

import torch
from xqa_probe import timed  # experiments/ is on the path when a script in it runs

DEV, HQ, HKV, D, PS = "cuda", 32, 8, 128, 16


def case(prefix: int, chunk: int, ws: torch.Tensor) -> None:
    import flashinfer

    n = prefix + chunk
    pages = -(-n // PS)
    # Pages in a shuffled order, as a long-running pool hands them out.
    pool = (torch.randn(pages + 64, 2, PS, HKV, D, device=DEV) * 0.5).to(torch.bfloat16)
    order = torch.randperm(pages + 64, device=DEV)[:pages].to(torch.int32)
    q = torch.randn(chunk, HQ, D, device=DEV, dtype=torch.bfloat16)
    i32 = torch.int32
    qo = torch.tensor([0, chunk], dtype=i32)
    kv_indptr = torch.tensor([0, pages], dtype=i32)
    last = torch.tensor([n - (pages - 1) * PS], dtype=i32)
    flops = 4 * HQ * D * (chunk * prefix + chunk * (chunk + 1) // 2)
    common = dict(causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, sm_scale=D**-0.5)
    rows, ref = [], None
    for backend in ("fa3", "fa2"):
        try:
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
            w.plan(qo, kv_indptr, order, last, HQ, HKV, D, PS, **common)
            out = w.run(q, pool)
            ref = out if ref is None else ref
            rows.append((f"paged {backend}", timed(lambda w=w: w.run(q, pool), 10), (out - ref).abs().max().item()))
        except Exception as e:  # a backend this build lacks: say so, time the rest
            print(f"  paged {backend}: {type(e).__name__}: {e}"[:300])

    def gather():
        kv = pool[order.long()]  # [pages, 2, PS, HKV, D]
        return kv[:, 0].reshape(-1, HKV, D)[:n], kv[:, 1].reshape(-1, HKV, D)[:n]

    k, v = gather()
    rows.append(("gather of the pages", timed(gather, 10), 0.0))
    for backend in ("fa3", "fa2"):
        try:
            w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend)
            w.plan(qo, torch.tensor([0, n], dtype=i32), HQ, HKV, D, **common)
            out = w.run(q, k, v)
            diff = (out - ref).abs().max().item() if ref is not None else float("nan")
            rows.append((f"ragged {backend}", timed(lambda w=w: w.run(q, k, v), 10), diff))
        except Exception as e:
            print(f"  ragged {backend}: {type(e).__name__}: {e}"[:300])
    print(f"\nchunk {chunk} after {prefix} cached tokens: {flops / 1e12:.2f} TFLOP of attention")
    for name, ms, err in rows:
        tf = "" if name.startswith("gather") else f"{flops / ms / 1e9:7.1f} TFLOP/s"
        print(f"  {name:22s} {ms:8.3f} ms  {tf}  max |diff| vs paged fa3 {err:.4f}")


def mixed(prefix: int, chunk: int, rows: int, ctx: int, ws: torch.Tensor, ws2: torch.Tensor) -> None:
    """A mixed step as W9 runs them: the chunk and `rows` decode rows of `ctx` keys each, in one paged
    prefill call (as the engine plans a mixed step) against the chunk through the prefill wrapper and
    the decode rows through the decode wrapper."""
    import flashinfer

    i32, n = torch.int32, prefix + chunk
    lens = [n] + [ctx] * rows
    npages = [-(-x // PS) for x in lens]
    total = sum(npages)
    pool = (torch.randn(total + 64, 2, PS, HKV, D, device=DEV) * 0.5).to(torch.bfloat16)
    order = torch.randperm(total + 64, device=DEV)[:total].to(i32)
    kv_indptr = torch.tensor([0, *torch.tensor(npages).cumsum(0).tolist()], dtype=i32)
    last = torch.tensor([x - (p - 1) * PS for x, p in zip(lens, npages)], dtype=i32)
    qo = torch.tensor([0, chunk, *range(chunk + 1, chunk + rows + 1)], dtype=i32)
    q = torch.randn(chunk + rows, HQ, D, device=DEV, dtype=torch.bfloat16)
    common = dict(q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, sm_scale=D**-0.5)
    one = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    one.plan(qo, kv_indptr, order, last, HQ, HKV, D, PS, causal=True, **common)
    ref = one.run(q, pool)
    pre = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    pre.plan(qo[:2], kv_indptr[:2], order[: npages[0]], last[:1], HQ, HKV, D, PS, causal=True, **common)
    dec = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws2, "NHD", use_tensor_cores=True)
    dec_indptr = kv_indptr[1:] - kv_indptr[1]
    dec.plan(dec_indptr, order[npages[0] :], last[1:], HQ, HKV, D, PS, **common)
    qa, qb = q[:chunk], q[chunk:]

    def split():
        return torch.cat([pre.run(qa, pool), dec.run(qb, pool)])

    diff = (split() - ref).abs().max().item()
    t_one, t_pre = timed(lambda: one.run(q, pool), 10), timed(lambda: pre.run(qa, pool), 10)
    t_dec = timed(lambda: dec.run(qb, pool), 10)
    print(f"\nmixed: chunk {chunk} after {prefix} cached + {rows} decode rows of {ctx} keys")
    print(f"  one paged prefill call        {t_one:8.3f} ms")
    print(f"  chunk alone (prefill wrapper) {t_pre:8.3f} ms; decode rows alone (decode wrapper) {t_dec:.3f} ms")
    print(f"  split, the two in a row       {t_pre + t_dec:8.3f} ms  max |diff| vs one call {diff:.4f}")


def main() -> None:
    torch.manual_seed(0)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    print(torch.cuda.get_device_name(), torch.__version__)
    for prefix in (0, 8192, 16384, 24576):
        case(prefix, 8192, ws)
    ws2 = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    for rows in (4, 16):
        mixed(16384, 8192, rows, 24576, ws, ws2)


if __name__ == "__main__":
    main()
