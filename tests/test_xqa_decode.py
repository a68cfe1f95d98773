"""`cache.flashinfer_decode=xqa` (nanoslg/cache/xqa_decode.py): the page table XQA reads, built on the
device from FlashInfer's CSR (kernels/page_table.py), and XQA's attention against a float32 one.

Where Triton is installed, the table kernel runs in Triton's interpreter on the CPU. On an SM90 GPU:
XQA through the backend's buffers, bf16 and FP8 pools, against float32 attention over the same pool,
with FlashInfer's decode wrapper's error printed next to it.
"""

from __future__ import annotations

import pytest
import torch
from triton_interp import interpret

TABLE = r"""
import torch
from nanoslg.cache.kernels.page_table import csr_to_table

# rows of 3, 1, 0 + 1 (a padding row: one page), 300 pages (over one 256-wide block), page size 16
counts = [3, 1, 1, 300]
last = torch.tensor([16, 1, 5, 9], dtype=torch.int32)
indptr = torch.tensor([0] + counts).cumsum(0).int()
indices = torch.randperm(400)[: sum(counts)].int()
table = torch.full((6, 320), -7, dtype=torch.int32)
lens = torch.full((6,), -7, dtype=torch.int32)
csr_to_table(indptr, indices, last, table, lens, 16)
for b, n in enumerate(counts):
    assert table[b, :n].tolist() == indices[indptr[b] : indptr[b + 1]].tolist(), b
    assert (table[b, n:] == -7).all(), b
assert lens.tolist() == [2 * 16 + 16, 1, 5, 299 * 16 + 9, -7, -7], lens
assert (table[4:] == -7).all()
try:
    csr_to_table(torch.zeros(8, dtype=torch.int32), indices, last, table, lens, 16)
except ValueError as e:
    assert "holds 6 contiguous rows, the step has 7" in str(e), e
else:
    raise AssertionError("seven rows in a six-row table")
print("ok")
"""


def test_page_table_in_the_interpreter():
    """Each row's pages land at the start of its table row, the rest untouched; its KV length is
    (pages - 1) x page size + the last page's length; a step larger than the table is refused."""
    interpret(TABLE)


EAGER = r"""
import types
import torch
import nanoslg.cache.flashinfer_backend as fb
from nanoslg.cache.backend import KVSpec

calls = []


def fake_xqa(q, cache, ws, table, lens, max_len, bmm1_scale, bmm2_scale, out):
    calls.append(dict(table=table.clone(), lens=lens.clone(), max_len=max_len, s1=bmm1_scale, s2=bmm2_scale))
    return out.fill_(1.0)


fi = types.SimpleNamespace(
    BatchPrefillWithPagedKVCacheWrapper=lambda *a, **k: object(),
    decode=types.SimpleNamespace(xqa_batch_decode_with_kv_cache=fake_xqa),
)
fb._import_flashinfer = lambda device: fi
spec = KVSpec(2, 2, 16, torch.bfloat16, torch.device("cpu"), 4, torch.float8_e4m3fn)
spec.max_model_len = 1000  # 63 pages of 16
be = fb.FlashInferBackend(spec, 16)


def step(counts, last):
    indptr = torch.tensor([0] + counts).cumsum(0).int()
    indices = torch.arange(sum(counts), dtype=torch.int32) + 7
    return be.xqa_eager(indptr, indices, torch.tensor(last, dtype=torch.int32), max(counts))


first = step([3, 1], [5, 16])
x = be._xqa_eager
assert x.table.shape == (64, 63), x.table.shape  # max_model_len's pages, as the graphs' table
q = torch.randn(2, 4, 16).to(torch.bfloat16)
out = first.run(q, None, k_scale=0.5, v_scale=2.0)
c = calls[-1]
assert c["table"].shape == (2, 63) and c["table"][0, :3].tolist() == [7, 8, 9] and c["table"][1, 0] == 10
assert c["lens"].tolist() == [37, 16] and c["max_len"] == 63 * 16
assert c["s1"] == 16**-0.5 * 0.5 and c["s2"] == 2.0 and out.shape == q.shape and bool((out == 1).all())
ws = x.workspace.data_ptr()
step([2] * 100, [1] * 100)  # more rows: the table grows, the width and the workspace stay
assert be._xqa_eager.table.shape == (128, 63) and be._xqa_eager.workspace.data_ptr() == ws
step([1], [3]).run(q[:1], None)
assert calls[-1]["max_len"] == 63 * 16 and be._xqa_eager.table.shape == (128, 63)  # no shrink, one width
try:
    first.run(q, None, return_lse=True)
except ValueError as e:
    assert "no log-sum-exp" in str(e)
else:
    raise AssertionError("XQA asked for a log-sum-exp")
print("ok")
"""


def test_eager_steps_keep_one_table_width():
    """Eager XQA steps (FlashInfer faked, the table kernel in the interpreter): the table is as wide as
    max_model_len's pages from the first step on, whatever the step's own longest row, so XQA's block
    split (which the width caps) does not depend on earlier steps; its rows grow with larger steps,
    the workspace stays; the layer's FP8 scales reach the kernel; no log-sum-exp is offered."""
    interpret(EAGER)


def test_graph_replay_writes_the_csr_for_xqa(monkeypatch):
    """The host side of an XQA graph replay (FlashInfer faked, on the CPU): with no plan() to copy it,
    prepare_replay writes positions, KV positions, page indices, indptr and last page lengths into the
    graph's buffers itself, padding rows on the scratch page; the plain variant runs XQA."""
    from types import SimpleNamespace

    import nanoslg.cache.flashinfer_backend as fb
    from nanoslg.cache.backend import KVSpec
    from nanoslg.cache.xqa_decode import XqaStep
    from nanoslg.core.plan import SeqStep, StepPlan

    fi = SimpleNamespace(
        BatchPrefillWithPagedKVCacheWrapper=lambda *a, **k: object(),
        decode=SimpleNamespace(xqa_batch_decode_with_kv_cache=None),
    )
    monkeypatch.setattr(fb, "_import_flashinfer", lambda device: fi)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    spec = KVSpec(2, 2, 16, torch.bfloat16, torch.device("cpu"), 4, torch.float8_e4m3fn)
    be = fb.FlashInferBackend(spec, 16)
    cache_cfg = SimpleNamespace(flashinfer_decode="auto", fused_rope="auto", mixed_attention="split")
    assert "XQA" in be.configure(cache_cfg) and be.xqa
    be.allocate(40)
    be.init_graphs(8, 1000)
    assert isinstance(be.capture_context(4, "plain").wrapper, XqaStep)
    tables = [[5], [9, 3], [7, 8, 2, 11]]  # the last one holds a page past its position
    plan = StepPlan(0, [SeqStep(i, [1], start, True, t) for i, (start, t) in enumerate(zip((0, 16, 40), tables))])
    assert be.prepare_replay(4, plan) == "plain"
    g = be._graphs
    assert g.positions[:4].tolist() == [0, 16, 40, 0] and g.kv_pos[:4].tolist() == [0, 16, 40, 0]
    assert g.indices[:7].tolist() == [5, 9, 3, 7, 8, 2, be.scratch_page]
    assert g.indptr[:5].tolist() == [0, 1, 3, 6, 7] and g.last_len[:4].tolist() == [1, 1, 9, 1]
    # The same step eagerly: XQA gets the longest row's pages (1, 2 and 3 here), counted as the CSR
    # is built, for its table's width where max_model_len is not known
    widths = []
    monkeypatch.setattr(be, "xqa_eager", lambda indptr, indices, last, max_pages: widths.append(max_pages) or "xqa")
    assert be.prepare(plan).wrapper == "xqa" and widths == [3]


def test_auto_takes_xqa_for_an_fp8_pool_on_sm90(monkeypatch):
    """auto: XQA for an FP8 pool on SM90 only (where it was measured faster); xqa asked for where it
    cannot run names the setting and the reason; the wrapper's own kernels are never replaced."""
    from types import SimpleNamespace

    from nanoslg.cache.backend import KVSpec
    from nanoslg.cache.xqa_decode import xqa_choice
    from nanoslg.core.errors import ConfigError

    fi = SimpleNamespace(decode=SimpleNamespace(xqa_batch_decode_with_kv_cache=None), __version__="test")
    fp8 = KVSpec(2, 8, 128, torch.bfloat16, torch.device("cpu"), 32, torch.float8_e4m3fn)
    bf16 = KVSpec(2, 8, 128, torch.bfloat16, torch.device("cpu"), 32)
    for cap in ((9, 0), (8, 9)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        picks = {
            (c, s.kv_dtype): xqa_choice(fi, s, 16, 32, c, "k") for c in ("auto", "cuda_cores") for s in (fp8, bf16)
        }
        assert [k for k, v in picks.items() if v] == ([("auto", torch.float8_e4m3fn)] if cap == (9, 0) else [])
        if cap == (9, 0):
            assert "auto: an FP8 pool on SM90" in picks["auto", torch.float8_e4m3fn]
            assert xqa_choice(fi, bf16, 16, 32, "xqa", "k") == "XQA (torch.bfloat16; cascade steps: the k kernel)"
            with pytest.raises(
                ConfigError, match=r"cache.flashinfer_decode=xqa cannot run here: XQA takes cache.page_size"
            ):
                xqa_choice(fi, fp8, 8, 32, "xqa", "k")
            assert xqa_choice(fi, fp8, 8, 32, "auto", "k") is None
        else:
            with pytest.raises(
                ConfigError, match="cannot run here: XQA runs on SM90, SM100 and SM120 GPUs, this one is SM8x"
            ):
                xqa_choice(fi, fp8, 16, 32, "xqa", "k")


def reference(q, cache, tables, lens, scale, scales=(1.0, 1.0)):
    out = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        kv = cache[tables[b, : -(-n // cache.shape[2])].long()].float()  # [p, 2, ps, H, D]
        k = kv[:, 0].flatten(0, 1)[:n] * scales[0]
        v = kv[:, 1].flatten(0, 1)[:n] * scales[1]
        g = q.shape[1] // k.shape[1]
        s = torch.einsum("hd,nhd->hn", q[b].float(), k.repeat_interleave(g, 1)) * scale
        out.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v.repeat_interleave(g, 1)))
    return torch.stack(out)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs an SM90 GPU"
)
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("hq, hkv, bs", [(16, 8, 37), (32, 8, 1), (32, 8, 130)])
def test_xqa_against_float32(kv_dtype, hq, hkv, bs):
    """XQA through XqaDecode (its table built from the CSR) is as close to float32 attention over the
    same pool as FlashInfer's decode wrapper is, within the rounding of q and the softmax weights to
    FP8 on an FP8 pool; FP8 scales other than 1 are applied."""
    import flashinfer

    from nanoslg.cache.backend import KVSpec
    from nanoslg.cache.xqa_decode import XqaDecode

    ps, d, dev = 16, 128, "cuda"
    g = torch.Generator().manual_seed(hq + bs)
    lens = torch.randint(1, 900, (bs,), generator=g)
    pages = (-(-lens // ps)).tolist()
    perm = torch.randperm(sum(pages) + 5, generator=g)[: sum(pages)].int()
    indptr = torch.tensor([0] + pages).cumsum(0).int()
    tables = torch.zeros(bs, max(pages), dtype=torch.int32)
    for b, p in enumerate(pages):
        tables[b, :p] = perm[indptr[b] : indptr[b + 1]]
    last = (lens - (torch.tensor(pages) - 1) * ps).int()
    cache = (torch.randn(sum(pages) + 5, 2, ps, hkv, d, generator=g) * 2).to(dev).to(kv_dtype)
    q = torch.randn(bs, hq, d, generator=g).to(dev, torch.bfloat16)
    scale, scales = d**-0.5, ((0.7, 1.3) if kv_dtype != torch.bfloat16 else (1.0, 1.0))
    ref = reference(q, cache, tables.to(dev), lens, scale, scales)
    spec = KVSpec(1, hkv, d, torch.bfloat16, torch.device(dev), hq, kv_dtype)
    x = XqaDecode(flashinfer, spec, ps, scale, 200, 64)
    csr = indptr.to(dev), perm.to(dev), last.to(dev)
    step = x.fill(*csr)
    kw = {"k_scale": scales[0], "v_scale": scales[1]} if kv_dtype != torch.bfloat16 else {}
    out = step.run(q, cache, **kw)
    assert torch.equal(x.seq_lens[:bs].cpu(), lens.int())
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    w.plan(
        indptr, perm.to(dev), last, hq, hkv, d, ps, q_data_type=torch.bfloat16, kv_data_type=kv_dtype, sm_scale=scale
    )
    fi_out = w.run(q, cache, **kw)
    err, fi_err = (out.float() - ref).abs().max().item(), (fi_out.float() - ref).abs().max().item()
    print(f"\nxqa {hq}/{hkv} bs={bs} {kv_dtype}: max |err| {err:.4f} (FlashInfer's decode wrapper {fi_err:.4f})")
    # bf16: both round the output once more. FP8: q and the probabilities in e4m3 (3 mantissa bits);
    # a wrong page or length would be off by about the values' own size (several units here).
    assert err <= (3 * fi_err + 0.02 if kv_dtype == torch.bfloat16 else 0.5), (err, fi_err)
    g2 = torch.cuda.CUDAGraph()  # replayed from a CUDA graph: the same bits
    with torch.cuda.graph(g2):
        x.fill(*csr)
        replayed = step.run(q, cache, **kw)
    g2.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, out)
