"""The sdpa backend's paged Triton decode kernel (nanoslg/cache/kernels/paged_decode.py, sdpa_paged.py).

Where Triton is installed (GPU or not), the kernel runs in Triton's interpreter on the CPU against
attention written out in float64, and the backend's mixed steps (decode rows beside prefill chunks,
freed pages reused) through it. On CUDA: the compiled kernel in bf16 at the demo shapes, and the
engine's greedy tokens with the kernel in CUDA graphs against its eager steps and the gather path.
"""

from __future__ import annotations

import json

import pytest
import torch
from triton_interp import interpret

from nanoslg.cache.sdpa_paged import num_splits
from nanoslg.runtime.graph_runner import BUCKETS


def reference(q, k_pool, v_pool, table, lens, rows, scale, page_size):
    """out[rows[b]] over the first lens[b] keys of row b's pages, in float64; other rows zero."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_pool.shape[1]
    for b, (n, t) in enumerate(zip(lens.tolist(), rows.tolist())):
        pos = torch.arange(n)
        slots = table[b].long().cpu()[pos // page_size] * page_size + pos % page_size
        k = k_pool.cpu()[slots].double().repeat_interleave(group, 1)
        v = v_pool.cpu()[slots].double().repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", q[t].cpu().double(), k) * scale
        out[t] = torch.einsum("hn,nhd->hd", s.softmax(-1), v) if n else 0.0
    return out


def case(hq, hkv, d, ps, lens, dtype, device, seed=0, strided=False):
    """Pools, a page table and q; strided: q is the first heads of a fused qkv output, as the model
    hands it over once rope ran in place (its token stride is not the output's)."""
    g = torch.Generator().manual_seed(seed)
    pages = sum(-(-n // ps) for n in lens) + 8
    k_pool, v_pool = (torch.randn(pages * ps, hkv, d, generator=g).to(dtype).to(device) for _ in range(2))
    tokens = len(lens) + 2
    q = torch.randn(tokens, hq + (2 * hkv if strided else 0), d, generator=g).to(dtype).to(device)[:, :hq]
    perm = torch.randperm(pages, generator=g)
    width = max(-(-n // ps) for n in lens)
    table = torch.zeros(len(lens), width, dtype=torch.long)
    used = 0
    for b, n in enumerate(lens):
        m = -(-n // ps)
        table[b, :m] = perm[used : used + m]
        used += m
    rows = torch.randperm(tokens, generator=g)[: len(lens)]
    return q, k_pool, v_pool, table.to(device), torch.tensor(lens).to(device), rows.to(device)


def test_split_counts_match_between_a_batch_and_its_graph_bucket():
    """An eager step and the CUDA-graph bucket that would replay it split each row alike."""
    for heads in (1, 2, 8):
        for n in range(1, BUCKETS[-1] + 1):
            bucket = next(b for b in BUCKETS if b >= n)
            assert num_splits(n, heads, torch.device("cpu")) == num_splits(bucket, heads, torch.device("cpu"))


def test_eager_steps_pass_the_kernel_aligned_arrays():
    """Triton compiles a kernel variant per pointer alignment and per stride's divisibility by 16; an
    eager step's arrays (slices of one host-to-device copy) keep both as the graph buffers do, so no
    eager step pays a compile. Odd-sized parts on purpose: 3 new-token slots, a 5-token chunk, then
    3 decode rows (the lens after 3 rows would start on 8 bytes without padding)."""
    from nanoslg.cache.backend import KVSpec
    from nanoslg.cache.sdpa import SdpaBackend
    from nanoslg.core.plan import SeqStep, StepPlan

    backend = SdpaBackend(KVSpec(2, 2, 16, torch.float32, torch.device("cpu"), 4), 4)
    backend.allocate(64)
    backend.triton = True
    backend.prepare(StepPlan(0, [SeqStep(1, [5] * 9, 0, True), SeqStep(2, [5] * 30, 0, True)]))
    ctx = backend.prepare(
        StepPlan(1, [SeqStep(1, [5], 9, True), SeqStep(3, [5] * 5, 0, True), SeqStep(2, [5], 30, True)])
    )
    p = ctx.paged
    assert p.table.stride(0) % 16 == 0 and p.table.shape == (2, 16)
    assert all(t.data_ptr() % 16 == 0 for t in (p.table, p.lens, p.rows))
    assert p.rows.tolist() == [0, 6] and p.lens.tolist() == [10, 31]
    assert ctx.new_slots.numel() == 7 and ctx.chunks[0].slots.numel() == 5
    ctx = backend.prepare(StepPlan(2, [SeqStep(1, [5], 10, True), SeqStep(3, [5], 5, True), SeqStep(2, [5], 31, True)]))
    p = ctx.paged
    assert all(t.data_ptr() % 16 == 0 for t in (p.table, p.lens, p.rows))
    assert p.rows.tolist() == [0, 1, 2] and p.lens.tolist() == [11, 6, 32] and p.table.shape == (3, 16)


INTERPRETED = r"""
import sys
import torch
sys.path.insert(0, "tests")
from test_sdpa_triton import case, reference
from test_sdpa_batched import Harness
from nanoslg.cache.kernels.paged_decode import paged_decode

cpu = torch.device("cpu")
# (Hq, Hkv, D, page size, lens, splits): GQA 1..4 and 3 (padded to 16 query rows), a row of 0 keys
# (zeros out), of 1 key, rows past one block; one split, several, more splits than a row has blocks.
# Strided: q a view of the fused qkv output, out its own contiguous tensor (the backends' case on a GPU).
for hq, hkv, d, ps, lens, splits, strided in [
    (4, 2, 16, 4, [37, 0, 1, 130], 1, False), (4, 2, 16, 4, [37, 0, 1, 130], 4, False),
    (8, 1, 32, 16, [200, 65, 64], 2, False), (6, 2, 16, 8, [5, 90, 1, 17], 8, False),
    (4, 4, 16, 16, [300, 2], 16, False), (4, 2, 16, 4, [37, 0, 1, 130], 1, True),
    (8, 1, 32, 16, [200, 65, 64], 2, True),
]:
    q, kp, vp, table, lens_t, rows = case(hq, hkv, d, ps, lens, torch.float32, cpu, strided=strided)
    assert q.is_contiguous() != strided
    out = torch.full(q.shape, 7.0)
    paged_decode(q, kp, vp, table, lens_t, rows, out, d**-0.5, ps, splits)
    want = reference(q, kp, vp, table, lens_t, rows, d**-0.5, ps)
    torch.testing.assert_close(out[rows].double(), want[rows], atol=1e-5, rtol=1e-5)
    others = [t for t in range(q.shape[0]) if t not in rows.tolist()]
    assert (out[others] == 7.0).all(), "rows that are not decode rows are left alone"

# The start-up probe: passes where the kernel runs, names the error where it cannot build.
from nanoslg.cache.backend import KVSpec
from nanoslg.cache.sdpa_paged import probe
assert probe(KVSpec(2, 2, 16, torch.float32, cpu, 4)) is None
assert "power of 2" in probe(KVSpec(2, 2, 24, torch.float32, cpu, 4))

# The backend's mixed steps, decode rows through the kernel (forced: triton_status wants CUDA).
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-2)):
    h = Harness(dtype=dtype, num_pages=80, tol={"atol": tol, "rtol": tol})
    h.backend.triton = True
    h.step([(1, 37), (2, 5)])
    h.step([(1, 1), (3, 20), (2, 1)])
    ctx = h.step([(3, 30), (2, 1), (1, 1), (4, 3)])
    assert ctx.paged is not None and not ctx.groups
    for _ in range(2):
        h.step([(1, 1), (2, 1), (3, 1), (4, 1)])
    h.step([(5, 150)])
    h.step([(6, 90), (1, 1), (3, 1)], freed=[5])
    h.step([(6, 1), (1, 1), (2, 1), (3, 1), (4, 1)])
print("ok")
"""


ENGINE = r"""
import json, sys
import nanoslg.cache.sdpa_paged as sdpa_paged
from nanoslg import LLM
from conftest import greedy

sdpa_paged.MAX_SPLITS = 2  # fewer programs: the interpreter runs each one in Python
path, cases = sys.argv[1], json.loads(open(sys.argv[2]).read())
if sys.argv[3] == "in_place":  # rope as FlashInfer's on a GPU: q and k stay strided views of qkv
    from nanoslg.model import kernels

    sdpa_paged.MAX_SPLITS = 1  # as a large batch on a GPU: the split kernel writes the output itself

    def rope_in_place(positions, q, k, cos_sin):
        q2, k2 = kernels.rope_torch(positions, q, k, cos_sin)
        return q.copy_(q2), k.copy_(k2)

    kernels.rope = rope_in_place
with LLM(f"model.path={path}", "cache=sdpa", "cache.sdpa_decode=gather") as llm:
    backend, kernel_steps = llm.engine.executor.backend, []
    backend.triton = True  # forced: triton_status wants CUDA
    prepare = backend.prepare
    backend.prepare = lambda plan: kernel_steps.append(prepare(plan)) or kernel_steps[-1]
    outs = llm.generate([c["prompt"] for c in cases], greedy())
assert sum(ctx.paged is not None for ctx in kernel_steps) >= 30, "decode steps should run the kernel"
for c, out in zip(cases, outs):
    assert out.token_ids == c["want"], (len(c["prompt"]), out.token_ids, c["want"])
print("ok")
"""


def test_kernel_and_backend_in_the_interpreter():
    interpret(INTERPRETED)


@pytest.mark.parametrize("rope", ["torch", "in_place"])
def test_engine_greedy_equals_transformers_in_the_interpreter(tiny_llama, hf_greedy, tmp_path, rope):
    """float32 on the CPU, every decode row through the kernel: transformers' greedy tokens exactly;
    also with rope in place, so q reaches the kernel as a strided view of the fused qkv output (one
    split: the kernel writes the contiguous output itself, with its own strides)."""
    pytest.importorskip("triton")
    from conftest import NEW, prompts_for

    prompts = prompts_for(512, (3, 11, 26, 41, 60, 90))  # the test tokenizer's vocabulary
    cases = [{"prompt": p, "want": hf_greedy(tiny_llama, p, NEW)} for p in prompts]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    interpret(ENGINE, str(tiny_llama), str(tmp_path / "cases.json"), rope)


@pytest.mark.parametrize("hq,hkv", [(16, 8), (32, 8), (8, 1)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_bf16_on_cuda(hq, hkv):
    """Qwen3-0.6B's and Llama-3.1-8B's heads (and GQA 8), head_dim 128, 16-token pages, bf16."""
    from nanoslg.cache.kernels.paged_decode import paged_decode

    dev = torch.device("cuda")
    lens = [0, 1, 15, 16, 17, 64, 65, 700, 1900, 4000]
    for strided in (False, True):  # q contiguous, or a view of the fused qkv output as the model passes it
        q, kp, vp, table, lens_t, rows = case(hq, hkv, 128, 16, lens, torch.bfloat16, dev, strided=strided)
        want = reference(q, kp, vp, table, lens_t, rows, 128**-0.5, 16)
        for splits in (1, 2, 16, num_splits(len(lens), hkv, dev)):
            out = torch.zeros(q.shape, dtype=q.dtype, device=dev)
            paged_decode(q, kp, vp, table, lens_t, rows, out, 128**-0.5, 16, splits)
            torch.testing.assert_close(out.cpu()[rows.cpu()].double(), want[rows.cpu()], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_graphs_give_the_tokens_of_eager_steps(tmp_path):
    """Greedy decoding with the kernel: CUDA graphs with overlap give exactly the tokens of eager steps
    (the split counts match); the gather path's bf16 tokens stay near the same (greedy ties)."""
    from test_gpu import GAP_TOL, _bf16_llama, greedy_gaps

    from nanoslg import LLM, SamplingParams

    path = _bf16_llama(tmp_path, kv_heads=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (3, 17, 40, 90, 130, 300)] * 4
    runs = {}
    modes = (("triton", "true", "false"), ("triton", "false", "true"), ("gather", "true", "false"))
    for decode, eager, overlap in modes:
        with LLM(
            f"model.path={path}",
            "cache=sdpa",
            f"cache.sdpa_decode={decode}",
            f"model.enforce_eager={eager}",
            f"scheduler.overlap={overlap}",
            "cache.max_num_tokens=16384",
            "scheduler.max_num_seqs=32",
        ) as llm:
            backend = llm.engine.executor.backend
            assert backend.triton == (decode == "triton")
            assert (llm.engine.executor.rt.runner.graphs is None) == (eager == "true")
            params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
            runs[decode, eager] = [o.token_ids for o in llm.generate(prompts, params)]
    assert runs["triton", "false"] == runs["triton", "true"]
    gaps = max(max(greedy_gaps(path, p, t)) for p, t in zip(prompts, runs["triton", "true"]))
    same = sum(a == b for x, y in zip(runs["triton", "true"], runs["gather", "true"]) for a, b in zip(x, y))
    print(f"\ntriton vs gather: {same}/{24 * len(prompts)} greedy tokens equal; triton's max gap {gaps:.3f} nats")
    assert gaps < GAP_TOL
