"""The FlashInfer backend's fused decode kernel: rotary, KV append and attention in one launch for steps
of a few rows (nanoslg/cache/kernels/fused_decode.py), and the rule that picks it (decode_choice.py).

Where Triton is installed the kernel runs in Triton's interpreter on the CPU (float32, with small
splits and tiles so that a few dozen keys cover every case: several tiles a split, several splits a
row, a split holding only the new key, a row of one key) against torch: the rotary of rope_torch, the
append written out by hand, softmax attention over the row's keys. On CUDA: bf16 against the backend's
unfused path (our rotary + append kernel, then FlashInfer's decode wrapper), eagerly and from a CUDA
graph, and launched right after the FP8 projection that writes its q, k and v.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from early_launch import assert_early_launch_reads_its_input
from triton_interp import interpret

from nanoslg.cache.decode_choice import FUSED_MAX_ROWS, fused_rows
from nanoslg.core.errors import ConfigError

CASE = r"""
import torch
from nanoslg.model.kernels import rope_torch
from nanoslg.model.layers import RotaryEmbedding


def case(dev, dtype, lens, hq=4, hk=2, d=32, page=4, seed=0):
    # One row per length (its KV position len - 1), pages scattered over a pool with spare pages,
    # q, k, v strided views of one fused qkv row, rotary positions of their own.
    g = torch.Generator().manual_seed(seed)
    counts = [(n + page - 1) // page for n in lens]
    total = sum(counts) + 5
    pages = torch.randperm(total, generator=g)[: sum(counts)].int()
    indptr = torch.tensor([0] + counts).cumsum(0).int()
    kv_pos = torch.tensor([n - 1 for n in lens], dtype=torch.int32)
    positions = torch.tensor([n - 1 + 3 * b for b, n in enumerate(lens)])
    t = len(lens)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(dtype)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)
    pool = torch.randn(total, 2, page, hk, d, generator=g).to(dtype)
    cos_sin = RotaryEmbedding(d, 4096, 10000.0, None).cos_sin_cache
    to = lambda *xs: [x.to(dev) for x in xs]
    return to(q, k, v, positions, cos_sin, pool, kv_pos, pages, indptr)


def expected(q, k, v, positions, cos_sin, pool, kv_pos, pages, indptr):
    # The pool after the append, and each row's attention over its kv_pos + 1 keys (float32 math).
    qr, kr = rope_torch(positions, q.clone(), k.clone(), cos_sin)
    want_pool = pool.clone()
    page, hq, hk = pool.shape[2], q.shape[1], k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for t in range(q.shape[0]):
        n = int(kv_pos[t]) + 1
        row_pages = pages[int(indptr[t]) : int(indptr[t + 1])].long()
        slot = int(row_pages[(n - 1) // page])
        want_pool[slot, 0, (n - 1) % page], want_pool[slot, 1, (n - 1) % page] = kr[t], v[t]
        keys = want_pool[row_pages, 0].reshape(-1, hk, q.shape[2])[:n].float()
        vals = want_pool[row_pages, 1].reshape(-1, hk, q.shape[2])[:n].float()
        group = hq // hk
        keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", qr[t].float(), keys) * q.shape[2] ** -0.5
        out[t] = torch.einsum("hn,nhd->hd", s.softmax(-1), vals)
    return out, want_pool
"""

INTERPRETED = (
    CASE
    + r"""
from nanoslg.cache.kernels import fused_decode as fd

fd.SPLITS, fd.BLOCK = 4, 16  # small, so that a few dozen keys reach every case
# per split: 16 keys up to 64, 32 up to 128, 64 up to 256. 17 and 33: the last split holds only the
# new key; 1: a row of one key; 150: two tiles a split and a last tile cut short.
for lens, hq, hk, d, page in (([1, 17, 33, 64], 4, 2, 32, 4), ([150, 5, 70], 8, 2, 64, 16), ([97], 2, 2, 32, 8)):
    args = case("cpu", torch.float32, lens, hq, hk, d, page)
    q, k, v, positions, cos_sin, pool, kv_pos, pages, indptr = args
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    want, want_pool = expected(*args)
    scratch = fd.FusedDecode(len(lens) + 1, hq, hk, d, "cpu")
    got = scratch.run(q, k, v, positions, cos_sin, pool, kv_pos, pages, indptr, d ** -0.5)
    assert torch.allclose(got, want, atol=2e-5, rtol=0), (lens, (got - want).abs().max())
    assert torch.allclose(pool, want_pool, atol=1e-6, rtol=0), (lens, (pool - want_pool).abs().max())
    assert torch.equal(pool[:, 1], want_pool[:, 1])  # v copied as is; every other slot untouched
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)
    assert not scratch.count.any()  # the counters are left at zero for the next launch
    again = scratch.run(q, k, v, positions, cos_sin, pool, kv_pos, pages, indptr, d ** -0.5)
    assert torch.equal(again, got)  # the same bits on a second launch (as a graph replays it)

try:  # a step larger than the scratch is refused, not run past its end
    fd.FusedDecode(1, 4, 2, 32, "cpu").run(*case("cpu", torch.float32, [3, 4])[:6], *args[6:], 1.0)
    raise SystemExit("no error")
except ValueError as e:
    assert "holds 1 rows" in str(e), e
print("ok")
"""
)


def test_fused_decode_in_the_interpreter():
    interpret(INTERPRETED)


def _spec(**kw):
    base = dict(dtype=torch.bfloat16, cache_dtype=torch.bfloat16, head_dim=128)
    return SimpleNamespace(**{**base, **kw})


def test_fused_decode_choice():
    """Only cache.flashinfer_decode=fused takes the fused kernel (auto leaves it off: it gains only at
    short contexts); where it cannot run that is a ConfigError naming why."""
    assert fused_rows(_spec(), "fused", True)[0] == FUSED_MAX_ROWS
    for choice in ("auto", "tensor_cores", "cuda_cores", "xqa"):
        assert fused_rows(_spec(), choice, True) == (0, "")
    fp8 = _spec(cache_dtype=torch.float8_e4m3fn)
    cases = [(fp8, True, "model's dtype"), (_spec(head_dim=80), True, "power of two"),
             (_spec(head_dim=16), True, "power of two"), (_spec(), False, "cache.fused_rope=off")]  # fmt: skip
    for spec, fused_rope, why in cases:
        with pytest.raises(ConfigError, match=f"cache.flashinfer_decode=fused cannot run here: .*{why}"):
            fused_rows(spec, "fused", fused_rope)
    from nanoslg.runtime.graph_runner import BUCKETS

    assert FUSED_MAX_ROWS in BUCKETS  # a step and the graph bucket that replays it take the same kernel


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _unfused(args, hq, hk, d, page):
    """The backend's path without the fused kernel: rotary + append, then FlashInfer's decode wrapper."""
    import flashinfer

    from nanoslg.cache.kernels.rope_append import rope_append

    q, k, v, positions, cos_sin, pool, kv_pos, pages, indptr = args
    t = q.shape[0]
    bidx = torch.arange(t, dtype=torch.int32, device="cuda")
    qr = torch.empty(q.shape, dtype=q.dtype, device="cuda")
    rope_append(q, k, v, positions, cos_sin, pool, bidx, kv_pos, pages, indptr, qr)
    last = ((kv_pos % page) + 1).int()
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(128 << 20, dtype=torch.uint8, device="cuda"), "NHD", use_tensor_cores=hq // hk >= 4
    )
    w.plan(indptr.cpu(), pages, last.cpu(), hq, hk, d, page, q_data_type=q.dtype, kv_data_type=pool.dtype,
           sm_scale=d**-0.5)  # fmt: skip
    return w.run(qr, pool)


@pytest.mark.gpu
@CUDA
def test_fused_decode_against_flashinfer():
    """bf16 at Llama-8B's and Qwen3-0.6B's head shapes, page 16, one and three rows at contexts from one
    key to several thousand: the output within bf16 distance of the unfused path, the pool the same
    bits; replayed from a CUDA graph on the pool as it was, the same bits as the eager launch."""
    from nanoslg.cache.kernels.fused_decode import FusedDecode

    scope: dict = {}
    exec(CASE, scope)
    for hq, hk in ((32, 8), (16, 8)):
        for lens in ([1], [130], [300], [1100], [5000], [7, 1024, 2049]):
            args = scope["case"]("cuda", torch.bfloat16, lens, hq, hk, 128, 16)
            orig, ref_pool = args[5].clone(), args[5].clone()
            want = _unfused([*args[:5], ref_pool, *args[6:]], hq, hk, 128, 16)
            scratch = FusedDecode(8, hq, hk, 128, "cuda")
            got = scratch.run(*args, 128**-0.5)
            diff = (got.float() - want.float()).abs().max().item()
            print(f"\nfused decode {hq}/{hk} lens {lens}: max |diff| {diff:.2e} against rope_append + FlashInfer")
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
            assert torch.equal(args[5], ref_pool)
            replay_pool = orig.clone()
            graph_args = [*args[:5], replay_pool, *args[6:]]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = scratch.run(*graph_args, 128**-0.5)
            replay_pool.copy_(orig)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(replayed, got) and torch.equal(replay_pool, ref_pool)
            assert not scratch.count.any()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU"
)
def test_fused_decode_launched_early_reads_its_input(monkeypatch):
    """On SM90 the kernel launches as a programmatic dependent and loads its first tile of cached keys
    before it waits: right after the FP8 skinny kernel that writes its q, k and v, and twice in a row
    (the second launch's counters and scratch are the first's), it gives the bits of the same kernels
    run one at a time with a synchronize between them, eagerly and from a CUDA graph."""
    from nanoslg.cache.kernels import fused_decode as fd
    from nanoslg.model.quant.fp8 import fp8_kernel, quantize_weight
    from nanoslg.model.quant.kernels import fp8 as fp8_k

    scope: dict = {}
    exec(CASE, scope)
    hq, hk, d, lens = 32, 8, 128, [300]
    args = scope["case"]("cuda", torch.bfloat16, lens, hq, hk, d, 16)
    q, k, v, positions, cos_sin, pool, kv_pos, pages, indptr = args
    torch.manual_seed(0)
    wq, ws = quantize_weight(torch.randn((hq + 2 * hk) * d, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    scratch = fd.FusedDecode(8, hq, hk, d, "cuda")

    def step(pool, sync=False):
        outs = []
        for _ in range(2):
            qkv = fp8_k.fp8_linear(x, wq, ws, None, fp8_kernel(wq))
            if sync:
                torch.cuda.synchronize()
            qq, kk, vv = qkv.split([hq * d, hk * d, hk * d], dim=-1)
            outs.append(scratch.run(qq.view(1, hq, d), kk.view(1, hk, d), vv.view(1, hk, d), positions, cos_sin,
                                    pool, kv_pos, pages, indptr, d**-0.5))  # fmt: skip
            if sync:
                torch.cuda.synchronize()
        return torch.cat(outs)

    assert_early_launch_reads_its_input(step, pool, (fd, fp8_k), monkeypatch)
