"""Speculative decoding on the GPU in bf16 (skipped without CUDA): FlashInfer verify steps next to
CUDA-graph decode steps, the draft's sdpa pool on the device, seeded sampling."""

import pytest
import torch
from test_gpu import GAP_TOL, _bf16_llama, greedy_gaps

from nanoslg import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    return _bf16_llama(tmp_path_factory.mktemp("bf16"), kv_heads=1)


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_greedy_with_speculation_on_gpu(spec, bf16_llama):
    """Every greedy token is the float32 reference's argmax up to bf16 noise, with graphs on for the
    decode steps that do not speculate; the target as its own draft has nearly everything accepted
    (bf16: the draft's sdpa decode and the target's FlashInfer extend may differ at near ties)."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (5, 37, 130)]
    prompts += [p * 3 for p in prompts]  # repeats for prompt lookup to find
    extra = ["speculative=ngram"] if spec == "ngram" else ["speculative=draft", "speculative.draft.path=target"]
    with LLM(f"model.path={bf16_llama}", "cache=flashinfer", "cache.max_num_tokens=16384", *extra) as llm:
        assert llm.engine.executor.rt.runner.graphs is not None and not llm.engine.overlap
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
        m = llm.engine.metrics
        kv = llm.engine.scheduler.kv
        kv.check()
        kv.flush()
        assert kv.num_free_pages() == kv.num_pages
    gaps = [greedy_gaps(bf16_llama, p, out.token_ids) for p, out in zip(prompts, outs)]
    print(
        f"\n{spec}: {m.spec_num_drafts} verify rows, {m.spec_num_draft_tokens} proposed, "
        f"{m.spec_num_accepted_tokens} accepted; max gap {max(map(max, gaps)):.3f} nats"
    )
    assert max(map(max, gaps)) < GAP_TOL, gaps
    assert m.spec_num_drafts > 0
    if spec == "draft":
        assert m.spec_num_accepted_tokens >= 0.9 * m.spec_num_draft_tokens


def test_seeded_sampling_with_a_draft_on_gpu(bf16_llama):
    """Sampled requests verified by the rejection rule on the device (seeded generators there too)."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (7, 50)]
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=24, ignore_eos=True) for i in (1, 2)]
    with LLM(
        f"model.path={bf16_llama}", "cache=flashinfer", "speculative=draft", "speculative.draft.path=target"
    ) as llm:
        outs = llm.generate(prompts, params)
        assert llm.engine.metrics.spec_num_accepted_tokens > 0
    assert all(len(o.token_ids) == 24 and o.finish_reason == "length" for o in outs)
