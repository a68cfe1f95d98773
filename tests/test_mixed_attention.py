"""cache.mixed_attention: a FlashInfer mixed step's leading decode rows through the decode kernel and
its prefill chunks through the prefill kernel. On the CPU with FlashInfer faked: which rows go where,
the two page-table CSRs (the second re-based), and the output in the step's row order. The kernels'
own agreement is the GPU test in tests/test_gpu.py."""

from types import SimpleNamespace

import torch

from nanoslg.cache.flashinfer_step import leading_decode_rows
from nanoslg.core.plan import SeqStep, StepPlan


class FakeWrapper:
    """Records plan()'s page table; run() tags each query row with the kernel that ran it."""

    def __init__(self, tag: float, log: list):
        self.tag, self.log = tag, log

    def plan(self, *args, **kwargs):
        self.log.append((self.tag, [a.tolist() if isinstance(a, torch.Tensor) else a for a in args[:4]]))

    def run(self, q, cache, **kwargs):
        return q * self.tag


def _backend(monkeypatch, mixed: str):
    import nanoslg.cache.flashinfer_backend as fb
    from nanoslg.cache.backend import KVSpec

    log: list = []
    fi = SimpleNamespace(
        BatchPrefillWithPagedKVCacheWrapper=lambda *a, **k: FakeWrapper(2.0, log),
        BatchDecodeWithPagedKVCacheWrapper=lambda *a, **k: FakeWrapper(3.0, log),
        page=SimpleNamespace(append_paged_kv_cache=lambda *a, **k: None),
    )
    monkeypatch.setattr(fb, "_import_flashinfer", lambda device: fi)
    be = fb.FlashInferBackend(KVSpec(2, 2, 8, torch.bfloat16, torch.device("cpu"), 4), 4)
    be.configure(SimpleNamespace(flashinfer_decode="cuda_cores", fused_rope="auto", mixed_attention=mixed))
    monkeypatch.setattr(be, "run_plan", lambda wrapper, *a, **k: wrapper.plan(*a, **k))
    be.allocate(32)
    return be, log


def _mixed_plan() -> StepPlan:
    """Two decode rows (contexts of 6 and 9 keys), a 5-token chunk after 3 cached tokens, then a
    decode row after the chunk (it stays with the prefill kernel: only the leading rows split)."""
    tables = [[1, 2], [3, 4, 5], [6, 7], [8, 9]]
    rows = [([1], 5), ([1], 8), ([1, 2, 3, 4, 5], 3), ([1], 4)]
    return StepPlan(0, [SeqStep(i, ids, start, True, t) for i, ((ids, start), t) in enumerate(zip(rows, tables))])


def test_leading_decode_rows():
    plan = _mixed_plan()
    assert leading_decode_rows(plan) == 2
    assert leading_decode_rows(StepPlan(0, plan.seqs[2:])) == 0  # starts with a chunk
    assert leading_decode_rows(StepPlan(0, [plan.seqs[0], plan.seqs[3]])) == 0  # nothing to split from


def test_split_step_plans_two_kernels_and_keeps_row_order(monkeypatch):
    be, log = _backend(monkeypatch, "split")
    ctx = be.prepare(_mixed_plan())
    assert ctx.split == 2 and be.split_steps == 1
    q = torch.arange(8 * 4 * 8, dtype=torch.float32).view(8, 4, 8)  # 8 query tokens, 4 heads, head_dim 8
    k = v = torch.zeros(8, 2, 8)
    out = ctx.attend(0, q, k, v)
    # The decode kernel (tag 3) planned over rows 0-1: pages [1, 2] and [3, 4, 5], last pages holding
    # 2 and 1 keys; the prefill kernel (tag 2) over the chunk and the trailing decode row, re-based.
    decode_plan, prefill_plan = log
    assert decode_plan == (3.0, [[0, 2, 5], [1, 2, 3, 4, 5], [2, 1], 4])
    assert prefill_plan == (2.0, [[0, 5, 6], [0, 2, 4], [6, 7, 8, 9], [4, 1]])
    assert torch.equal(out, torch.cat([q[:2] * 3.0, q[2:] * 2.0]))


def test_one_call_runs_every_row_through_the_prefill_kernel(monkeypatch):
    be, log = _backend(monkeypatch, "one")
    ctx = be.prepare(_mixed_plan())
    assert ctx.split == 0 and be.split_steps == 0
    q = torch.randn(8, 4, 8)
    out = ctx.attend(0, q, torch.zeros(8, 2, 8), torch.zeros(8, 2, 8))
    assert log == [(2.0, [[0, 1, 2, 7, 8], [0, 2, 5, 7, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9], [2, 1, 4, 1]])]
    assert torch.equal(out, q * 2.0)
