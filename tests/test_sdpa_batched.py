"""The sdpa backend's page pool and batched decode attention (nanoslg/cache/sdpa.py, sdpa_decode.py).

Backend level: steps mixing decode rows of different lengths with prefill chunks, against plain
attention over each sequence's whole K/V, in float32, a bf16 pool and an FP8 pool; freed pages
reused. Engine level: greedy tokens still equal transformers'. On CUDA (skipped without it): the
batched call in bf16 against the per-sequence path, on the memory-efficient kernel alone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import greedy, prompts_for

from nanoslg.cache import sdpa_decode
from nanoslg.cache.backend import KVSpec
from nanoslg.cache.kv_quant import FP8, from_cache, to_cache
from nanoslg.cache.sdpa import SdpaBackend, attend_one
from nanoslg.core.plan import SeqStep, StepPlan

HQ, HKV, D, LAYERS, PAGE = 4, 2, 16, 2, 4


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Attention written out in float64: q [n, Hq, D] at positions start.., k, v [start+n, Hkv, D]."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # query head h reads KV head h // g
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    qpos = torch.arange(start, start + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class Harness:
    """Runs steps through a backend and checks every layer's output against `reference` over the K/V
    each sequence stored so far (rounded as the pool stores it)."""

    def __init__(self, dtype=torch.float32, kv_dtype=None, scales=None, num_pages=256, tol=None):
        spec = KVSpec(LAYERS, HKV, D, dtype, torch.device("cpu"), HQ, kv_dtype, scales)
        self.backend = SdpaBackend(spec, PAGE)
        self.backend.allocate(num_pages)
        self.spec, self.dtype, self.tol = spec, dtype, tol or {"atol": 1e-5, "rtol": 1e-5}
        self.kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (seq, layer) -> stored K, V
        self.len: dict[int, int] = {}
        self.gen = torch.Generator().manual_seed(0)

    def stored(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return from_cache(to_cache(x, scale, self.spec.cache_dtype), scale, x.dtype)

    def step(self, work: list[tuple[int, int]], freed=()):
        """work: (seq id, new tokens) in row order."""
        for s in freed:
            self.len.pop(s, None)
            for layer in range(LAYERS):
                self.kv.pop((s, layer), None)
        seqs = [SeqStep(s, [7] * n, self.len.get(s, 0), True) for s, n in work]
        ctx = self.backend.prepare(StepPlan(0, seqs, freed=list(freed)))
        t = sum(n for _, n in work)
        assert ctx.positions.tolist() == [p for st in seqs for p in range(st.start, st.start + len(st.token_ids))]
        for layer in range(LAYERS):
            q, k, v = (torch.randn(t, h, D, generator=self.gen).to(self.dtype) for h in (HQ, HKV, HKV))
            out = ctx.attend(layer, q, k, v)
            ks, vs = self.spec.scales(layer)
            off = 0
            for st in seqs:
                n = len(st.token_ids)
                old_k, old_v = self.kv.get((st.seq_id, layer), (k[:0], v[:0]))
                new_k = torch.cat([old_k, self.stored(k[off : off + n], ks)])
                new_v = torch.cat([old_v, self.stored(v[off : off + n], vs)])
                self.kv[(st.seq_id, layer)] = (new_k, new_v)
                want = reference(q[off : off + n], new_k, new_v, st.start, D**-0.5)
                torch.testing.assert_close(out[off : off + n].double(), want, **self.tol)
                off += n
        for st in seqs:
            self.len[st.seq_id] = st.start + len(st.token_ids)
        return ctx

    def run_mixed(self):
        """Prefills, chunks over existing KV, decode rows of several lengths beside chunks, pure decode
        steps, several decode groups, and a freed sequence's pages going to a new one."""
        self.step([(1, 37), (2, 5)])
        self.step([(1, 1), (3, 20), (2, 1)])  # decodes around a prefill chunk
        self.step([(3, 30), (2, 1), (1, 1), (4, 3)])  # a chunk over existing KV, then decodes
        for _ in range(3):
            ctx = self.step([(1, 1), (2, 1), (3, 1), (4, 1)])
        assert len(ctx.groups) == 1 and ctx.groups[0].rows is None  # a plain decode step: one call
        self.step([(5, 150)])
        ctx = self.step([(4, 1), (5, 1), (1, 1), (2, 1), (3, 1)])
        assert len(ctx.groups) == 2, "151 keys beside 7..54: two groups at SPLIT_MIN=64"
        old = set(self.backend.pages[5])
        self.step([(6, 90), (1, 1), (3, 1)], freed=[5])  # 6 takes 5's pages
        assert old & set(self.backend.pages[6]), "a freed sequence's pages go to the next one"
        for _ in range(2):
            self.step([(6, 1), (1, 1), (2, 1), (3, 1), (4, 1)])
        self.step([(2, 1)], freed=[1, 3, 4, 6])
        assert sorted(self.backend.free + self.backend.pages[2]) == list(range(self.backend.num_pages))


@pytest.fixture
def split_small(monkeypatch):
    """Groups wider than 64 keys split for padding, so short test sequences make several groups."""
    monkeypatch.setattr(sdpa_decode, "SPLIT_MIN", 64)


def test_batched_decode_equals_per_sequence_attention(split_small):
    h = Harness(num_pages=80)  # the CPU pool starts at 64 pages and must grow
    first = h.backend.pool.shape[2]
    h.run_mixed()
    assert first < h.backend.pool.shape[2] <= 80 * PAGE


def test_bf16_pool(split_small):
    Harness(dtype=torch.bfloat16, tol={"atol": 2e-2, "rtol": 2e-2}).run_mixed()


def test_fp8_pool(split_small):
    scales = [(0.5, 2.0), (1.0, 0.25)]
    Harness(kv_dtype=FP8, scales=scales, tol={"atol": 1e-5, "rtol": 1e-5}).run_mixed()


def test_group_rows():
    split = sdpa_decode.group_rows
    assert split([5, 300, 40], 10**6) == [[0, 1, 2]]  # narrow: one group
    lens = [2000, 100, 1500, 900, 1100, 30]
    assert split(lens, 10**6) == [[0, 2, 4], [3], [1, 5]]  # over half of 2048 wide; of 960; <= SPLIT_MIN
    assert split([2000] * 5, 2 * 2048) == [[0, 1], [2, 3], [4]]  # the gather cap


def test_engine_greedy_equals_transformers(tiny_llama, hf_greedy, split_small):
    """Sequences of different lengths decode together: batched rows in several groups, the CPU pool
    growing past its first pages, and (second run) preemption under a small budget."""
    from nanoslg import LLM
    from nanoslg.cache.sdpa import CPU_FIRST_PAGES

    lengths = (3, 11, 26, 41, 60, 75, 90, 120, 150, 200, 250, 300)
    for overrides, n in (([], 12), (["cache.max_num_tokens=320", "cache.page_size=8"], 8)):
        with LLM(f"model.path={tiny_llama}", "cache=sdpa", *overrides) as llm:
            backend, rows = llm.engine.executor.backend, []
            backend.prepare = _counting(backend.prepare, rows)
            prompts = prompts_for(llm.engine.vocab_size, lengths[:n])
            outs = llm.generate(prompts, greedy())
            preemptions = llm.engine.metrics.preemptions
        for p, out in zip(prompts, outs):
            assert out.token_ids == hf_greedy(tiny_llama, p, 32), f"prompt of {len(p)} tokens differs ({overrides})"
        assert max(r[0] for r in rows) >= 4, "decode steps should batch several rows in one call"
        if overrides:
            assert preemptions > 0, "the KV budget was meant to force preemption"
        else:
            assert max(r[1] for r in rows) > 1, "lengths this far apart should make several groups"
            assert backend.pool.shape[2] > CPU_FIRST_PAGES * 16, "the pool should have grown"


def _counting(prepare, rows: list):
    """prepare, noting per step (most rows in one decode group, number of groups)."""

    def run(plan):
        ctx = prepare(plan)
        rows.append((max((g.slots.shape[0] for g in ctx.groups), default=0), len(ctx.groups)))
        return ctx

    return run


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_decode_on_cuda_bf16():
    """B=64 decode rows of 1100..1900 keys in bf16 (Qwen3-0.6B's heads): the production call runs
    under the memory-efficient kernel alone (a math fallback would raise) and agrees with the
    per-sequence path."""
    from torch.nn.attention import SDPBackend

    dev, hq, hkv, d, ps = torch.device("cuda"), 16, 8, 128, 16
    backend = SdpaBackend(KVSpec(1, hkv, d, torch.bfloat16, dev, hq), ps)
    if torch.cuda.get_device_capability() >= (8, 0):
        assert backend.kernels == [SDPBackend.EFFICIENT_ATTENTION]
    backend.allocate(64 * 2048 // ps)
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(1100, 1900, (64,), generator=gen).tolist()
    prefill = backend.prepare(StepPlan(0, [SeqStep(i, [0] * n, 0, True) for i, n in enumerate(lens)]))
    t = sum(lens)
    k, v = torch.randn(2, t, hkv, d, device=dev, dtype=torch.bfloat16)
    prefill.attend(0, torch.randn(t, hq, d, device=dev, dtype=torch.bfloat16), k, v)
    ctx = backend.prepare(StepPlan(1, [SeqStep(i, [0], n, True) for i, n in enumerate(lens)]))
    assert len(ctx.groups) == 1 and ctx.groups[0].rows is None
    q, k1, v1 = (torch.randn(64, h, d, device=dev, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    out = ctx.attend(0, q, k1, v1)
    torch.cuda.synchronize()
    starts = [0, *torch.tensor(lens).cumsum(0).tolist()]
    for i, n in enumerate(lens):
        ki = torch.cat([k[starts[i] : starts[i] + n], k1[i : i + 1]])
        vi = torch.cat([v[starts[i] : starts[i] + n], v1[i : i + 1]])
        want = attend_one(q[i : i + 1], ki, vi, n, d**-0.5)
        torch.testing.assert_close(out[i : i + 1], want, atol=2e-2, rtol=2e-2)
