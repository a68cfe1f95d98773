"""The FlashInfer backend's fused rotary + KV append for decode steps (nanoslg/cache/kernels/rope_append.py).

Where Triton is installed, the kernel runs in Triton's interpreter on the CPU (float32) against the
torch rotary and an append written out by hand: q rotated into its buffer, k rotated and v copied
into their page slots, every other slot of the pool and q, k themselves untouched. On CUDA: in bf16
against FlashInfer's rope followed by its append, eagerly and from a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from early_launch import assert_early_launch_reads_its_input
from triton_interp import interpret

CASE = r"""
import torch
from nanoslg.model.kernels import rope_torch
from nanoslg.model.layers import RotaryEmbedding


def case(dev, dtype, hq=4, hk=2, d=32, page=4, seed=0):
    # Three sequences at KV positions 0, 5 and 10 (a page boundary, mid-page), their pages scattered,
    # q, k, v strided views of one fused qkv row, as the model hands them over.
    g = torch.Generator().manual_seed(seed)
    lens = [1, 6, 11]
    pages = torch.randperm(12, generator=g)[: sum((n + page - 1) // page for n in lens)].int()
    indptr = torch.tensor([0] + [(n + page - 1) // page for n in lens]).cumsum(0).int()
    kv_pos = torch.tensor([n - 1 for n in lens], dtype=torch.int32)
    positions = torch.tensor([n - 1 + 7 * b for b, n in enumerate(lens)])  # rope positions of their own
    qkv = torch.randn(3, (hq + 2 * hk) * d, generator=g).to(dtype)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(3, hq, d), k.view(3, hk, d), v.view(3, hk, d)
    pool = torch.randn(12, 2, page, hk, d, generator=g).to(dtype)
    cos_sin = RotaryEmbedding(d, 64, 10000.0, None).cos_sin_cache
    to = lambda *xs: [x.to(dev) for x in xs]
    return to(q, k, v, positions, cos_sin, pool, torch.arange(3, dtype=torch.int32), kv_pos, pages, indptr)


def expected(q, k, v, positions, cos_sin, pool, bidx, kv_pos, pages, indptr):
    qr, kr = rope_torch(positions, q.clone(), k.clone(), cos_sin)
    want = pool.clone()
    page = pool.shape[2]
    for t in range(q.shape[0]):
        b, p = int(bidx[t]), int(kv_pos[t])
        slot = int(pages[int(indptr[b]) + p // page])
        want[slot, 0, p % page], want[slot, 1, p % page] = kr[t], v[t]
    return qr, want
"""

INTERPRETED = (
    CASE
    + r"""
from nanoslg.cache.kernels.rope_append import rope_append

args = case("cpu", torch.float32)
q, k, v, positions, cos_sin, pool = args[:6]
q0, k0 = q.clone(), k.clone()
want_q, want_pool = expected(*args)
out = torch.empty(q.shape)
rope_append(*args, out)
assert torch.allclose(out, want_q, atol=1e-6, rtol=0), (out - want_q).abs().max()
assert torch.allclose(pool, want_pool, atol=1e-6, rtol=0), (pool - want_pool).abs().max()
assert torch.equal(pool[:, 1], want_pool[:, 1])  # v copied as is; untouched slots stay
assert torch.equal(q, q0) and torch.equal(k, k0)

# An FP8 pool: k rotated, then both stored as kv_quant.to_cache does (divided by the layer's scale,
# saturated, rounded): the same bytes. Triton's interpreter rounds to float8 wrongly where the mantissa
# carries into the exponent, so here every stored value is exact: values on the float8 grid, rotation
# by position 0 (cos 1, sin 0), power-of-two scales (one saturates v). The GPU test rounds for real.
from nanoslg.cache.kv_quant import FP8, to_cache

grid = torch.tensor([0.0, 0.5, -1.0, 3.0, -448.0, 448.0, 13.0, -0.125, 0.25, -6.0])
for scales in ((1.0, 1.0), (0.5, 2.0 ** -6), (2.0, 0.25)):
    args = case("cpu", torch.float32)
    q, k, v, positions, cos_sin, pool = args[:6]
    g = torch.Generator().manual_seed(1)
    for x in (q, k, v):
        x.copy_(grid[torch.randint(0, len(grid), x.shape, generator=g)] * 0.25)
    positions.zero_()
    pool8 = pool.to(FP8)
    want8 = pool8.clone()
    page = pool.shape[2]
    bidx, kv_pos, pages, indptr = args[6:]
    for t in range(q.shape[0]):
        b, p = int(bidx[t]), int(kv_pos[t])
        slot = int(pages[int(indptr[b]) + p // page])
        want8[slot, 0, p % page] = to_cache(k[t], scales[0], FP8)
        want8[slot, 1, p % page] = to_cache(v[t], scales[1], FP8)
    out = torch.empty(q.shape)
    rope_append(q, k, v, positions, cos_sin, pool8, *args[6:], out, scales=scales)
    assert torch.equal(out, q)
    assert torch.equal(pool8.view(torch.uint8), want8.view(torch.uint8)), scales
    assert (v.abs() / scales[1] > 448.0).any() == (scales[1] < 0.25)  # the second case saturates v
print("ok")
"""
)


def test_rope_append_in_the_interpreter():
    interpret(INTERPRETED)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rope_append_against_flashinfer():
    """bf16: the fused kernel against FlashInfer's rope in place and its append, eagerly and replayed."""
    import flashinfer

    from nanoslg.cache.kernels.rope_append import rope_append

    scope: dict = {}
    exec(CASE, scope)
    for hq, hk, d in ((32, 8, 128), (16, 8, 64)):
        args = scope["case"]("cuda", torch.bfloat16, hq, hk, d, 16)
        q, k, v, positions, cos_sin, pool, bidx, kv_pos, pages, indptr = args
        last = torch.tensor([1, 6, 11], dtype=torch.int32, device="cuda")  # last pages' lengths (page 16)
        orig, ref_pool, qr, kr = pool.clone(), pool.clone(), q.clone(), k.clone()
        flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(positions, qr, kr, d, cos_sin, True)
        flashinfer.page.append_paged_kv_cache(kr, v, bidx, kv_pos, ref_pool, pages, indptr, last, kv_layout="NHD")
        out = torch.empty(q.shape, dtype=q.dtype, device="cuda")
        rope_append(*args, out)
        same_q, same_k = (out == qr).float().mean().item(), (pool == ref_pool).float().mean().item()
        print(f"\nrope_append {hq}/{hk}x{d} against FlashInfer: q {same_q:.4f}, pool {same_k:.4f} of the bits equal")
        torch.testing.assert_close(out, qr, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(pool, ref_pool, atol=1e-2, rtol=1e-2)
        assert torch.equal(pool[:, 1], ref_pool[:, 1])
        # replayed from a CUDA graph (compiled by the call above) on the pool as it was: the same bits
        graph = torch.cuda.CUDAGraph()
        replay_pool, replay_out = orig.clone(), torch.empty_like(out)
        with torch.cuda.graph(graph):
            rope_append(q, k, v, positions, cos_sin, replay_pool, bidx, kv_pos, pages, indptr, replay_out)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replay_out, out) and torch.equal(replay_pool, pool)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rope_append_fp8_pool_against_flashinfer():
    """An FP8 pool, bf16 model: the fused kernel against the backend's unfused path (FlashInfer's rope,
    kv_quant's cast with the layer's scales, FlashInfer's append): the same pool bytes."""
    import flashinfer

    from nanoslg.cache.kernels.rope_append import rope_append
    from nanoslg.cache.kv_quant import FP8, to_cache_pair

    scope: dict = {}
    exec(CASE, scope)
    for scales in ((1.0, 1.0), (0.37, 0.05)):
        args = scope["case"]("cuda", torch.bfloat16, 32, 8, 128, 16)
        q, k, v, positions, cos_sin, pool, bidx, kv_pos, pages, indptr = args
        pool = pool.to(FP8)
        last = torch.tensor([1, 6, 11], dtype=torch.int32, device="cuda")
        ref_pool, qr, kr = pool.clone(), q.clone(), k.clone()
        flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(positions, qr, kr, 128, cos_sin, True)
        k8, v8 = to_cache_pair(kr, v, scales, FP8)
        flashinfer.page.append_paged_kv_cache(k8, v8, bidx, kv_pos, ref_pool, pages, indptr, last, kv_layout="NHD")
        out = torch.empty(q.shape, dtype=q.dtype, device="cuda")
        rope_append(q, k, v, positions, cos_sin, pool, bidx, kv_pos, pages, indptr, out, scales=scales)
        same = (pool.view(torch.uint8) == ref_pool.view(torch.uint8)).float().mean().item()
        print(f"\nrope_append into an FP8 pool, scales {scales}: {same:.4f} of the pool's bytes equal")
        assert torch.equal(out, qr)
        assert torch.equal(pool.view(torch.uint8), ref_pool.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU"
)
def test_rope_append_launched_early_reads_its_input(monkeypatch):
    """On SM90 the kernel launches as a programmatic dependent: right after the FP8 skinny kernel that
    writes its q, k and v (and lets it launch early), it gives the bits of the same two kernels run
    one at a time with a synchronize between them, eagerly and from a CUDA graph."""
    from nanoslg.cache.kernels import rope_append as ra
    from nanoslg.model.quant.fp8 import fp8_kernel, quantize_weight
    from nanoslg.model.quant.kernels import fp8 as fp8_k

    scope: dict = {}
    exec(CASE, scope)
    hq, hk, d = 32, 8, 128
    q, k, v, positions, cos_sin, pool, bidx, kv_pos, pages, indptr = scope["case"](
        "cuda", torch.bfloat16, hq, hk, d, 16
    )
    torch.manual_seed(0)
    wq, ws = quantize_weight(torch.randn((hq + 2 * hk) * d, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)

    def step(pool, sync=False):
        qkv = fp8_k.fp8_linear(x, wq, ws, None, fp8_kernel(wq))
        if sync:
            torch.cuda.synchronize()
        qq, kk, vv = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        out = torch.empty(3, hq, d, device="cuda", dtype=torch.bfloat16)
        ra.rope_append(qq.view(3, hq, d), kk.view(3, hk, d), vv.view(3, hk, d), positions, cos_sin, pool, bidx,
                       kv_pos, pages, indptr, out)  # fmt: skip
        return out

    assert_early_launch_reads_its_input(step, pool, (ra, fp8_k), monkeypatch)
