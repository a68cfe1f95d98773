"""Cascade attention (nanoslg/cache/cascade.py): the shared-prefix decision, the two-level math, and
the engine on the CPU's paged backend: cascade on and off give the same greedy tokens as transformers."""

import random
from types import SimpleNamespace

import pytest
import torch

from nanoslg import LLM, SamplingParams
from nanoslg.cache.cascade import MIN_BATCH, MIN_SHARED_TOKENS, attend_lse, merge, shared_prefix_pages
from nanoslg.cache.sdpa import attend_one

PS = 16
NEW = 24


def _seqs(tables, starts):
    return [SimpleNamespace(block_table=t, start=s) for t, s in zip(tables, starts)]


def test_shared_prefix_pages():
    shared = list(range(100, 120))  # 20 pages = 320 tokens
    tables = [shared + [200 + i, 300 + i] for i in range(MIN_BATCH)]
    starts = [20 * PS + 5] * MIN_BATCH
    assert shared_prefix_pages(_seqs(tables, starts), PS) == 20
    # A page being written this step is not shared: a sequence whose token lands in page 18.
    assert shared_prefix_pages(_seqs(tables, starts[:-1] + [18 * PS + 3]), PS) == 18
    # One sequence diverges at page 17: the common part ends there.
    diverged = tables[:-1] + [shared[:17] + [999] + shared[18:] + [1, 2]]
    assert shared_prefix_pages(_seqs(diverged, starts), PS) == 17
    # Too little to pay off: below MIN_SHARED_TOKENS, or fewer than MIN_BATCH sequences.
    short = MIN_SHARED_TOKENS // PS - 1
    assert shared_prefix_pages(_seqs(tables, [short * PS + 1] * MIN_BATCH), PS) == 0
    assert shared_prefix_pages(_seqs(tables[:-1], starts[:-1]), PS) == 0
    early = tables[:-1] + [[7] + shared[1:] + [1, 2]]  # differs at the first page
    assert shared_prefix_pages(_seqs(early, starts), PS) == 0


def test_two_levels_merged_equal_one_attention():
    torch.manual_seed(0)
    q = torch.randn(5, 8, 32)
    k, v = torch.randn(300, 2, 32), torch.randn(300, 2, 32)
    scale = 32**-0.5
    ref = torch.cat([attend_one(q[i : i + 1], k, v, 299, scale) for i in range(5)])
    out0, lse0 = attend_lse(q, k[:256], v[:256], scale)
    out1, lse1 = attend_lse(q, k[256:], v[256:], scale)
    torch.testing.assert_close(merge(out0, lse0, out1, lse1), ref, atol=1e-5, rtol=1e-5)
    full, lse = attend_lse(q, k, v, scale)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logaddexp(lse0, lse1), atol=1e-5, rtol=1e-5)
    # The causal form: a chunk of 5 queries at positions 295..299 over keys 0..299.
    causal, _ = attend_lse(q, k, v, scale, start=295)
    torch.testing.assert_close(causal, attend_one(q, k, v, 295, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen3"])
def test_cascade_attention_changes_no_token(model, request, hf_greedy):
    path = request.getfixturevalue(model)
    rng = random.Random(9)
    runs = {}
    for cascade in ("true", "false"):
        with LLM(f"model.path={path}", "cache=paged", "cache.page_size=4", f"cache.cascade_attention={cascade}") as llm:
            vocab = llm.engine.vocab_size
            if not runs:
                base = [rng.randrange(3, vocab) for _ in range(MIN_SHARED_TOKENS + 8)]
                prompts = [
                    base + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 9))] for _ in range(MIN_BATCH + 1)
                ]
            llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=1))  # caches the base
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
            backend = llm.engine.executor.rt.backend
            runs[cascade] = [o.token_ids for o in outs], backend.cascade_steps
    (on, steps_on), (off, steps_off) = runs["true"], runs["false"]
    # Every decode step with all 9 sequences running shares the base (the prefill steps do not).
    assert steps_on >= NEW - 2 and steps_off == 0, (steps_on, steps_off)
    assert on == off
    for p, t in zip(prompts, on):
        assert t == hf_greedy(path, p, NEW)
