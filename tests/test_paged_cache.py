"""The paged KV path end to end: backend attention over page tables, prefix caching in the engine
(CPU, `cache=paged`), and FlashInfer against SDPA on the GPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from conftest import NEW, greedy

from nanoslg.cache.backend import KVSpec
from nanoslg.cache.paged import PagedKVManager
from nanoslg.cache.paged_torch import PagedTorchBackend
from nanoslg.cache.sdpa import attend_one
from nanoslg.core.plan import SeqStep, StepPlan
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.core.sequence import Sequence

HQ, HKV, D, LAYERS = 4, 2, 8, 2


def _run_step(backend, kv, steps, ref_kv, gen):
    """Runs one step of (seq, n new tokens) through the backend; checks every layer's output."""
    plan_steps = []
    for seq, n in steps:
        kv.grow(seq, seq.num_computed_tokens + n)
        start = seq.num_computed_tokens
        plan_steps.append(SeqStep(seq.seq_id, seq.token_ids[start : start + n], start, True, list(seq.block_table)))
    plan = StepPlan(0, plan_steps, copies=kv.pop_copies())
    ctx = backend.prepare(plan)
    total = plan.num_tokens
    for layer in range(LAYERS):
        q = torch.randn(total, HQ, D, generator=gen)
        k = torch.randn(total, HKV, D, generator=gen)
        v = torch.randn(total, HKV, D, generator=gen)
        out = ctx.attend(layer, q, k, v)
        off = 0
        for (seq, n), st in zip(steps, plan_steps):
            ks, vs = ref_kv.setdefault((seq.seq_id, layer), ([], []))
            del ks[st.start :], vs[st.start :]
            ks.extend(k[off : off + n])
            vs.extend(v[off : off + n])
            want = attend_one(q[off : off + n], torch.stack(ks), torch.stack(vs), st.start, D**-0.5)
            torch.testing.assert_close(out[off : off + n], want)
            off += n
    for seq, n in steps:
        seq.num_computed_tokens += n


def test_paged_torch_attention_with_chunks_prefix_hits_and_copy_on_write():
    gen = torch.Generator().manual_seed(0)
    backend = PagedTorchBackend(KVSpec(LAYERS, HKV, D, torch.float32, torch.device("cpu")), 4)
    backend.allocate(16)
    kv = PagedKVManager(16, 4)
    ref: dict = {}
    params = SamplingParams(max_tokens=4)
    a = Sequence("a", list(range(11)), params)
    kv.match_prefix(a)
    _run_step(backend, kv, [(a, 6)], ref, gen)  # chunked prefill: 6, then 5 over existing KV
    _run_step(backend, kv, [(a, 5)], ref, gen)
    a.token_ids.append(99)
    _run_step(backend, kv, [(a, 1)], ref, gen)  # a decode; caches a's full pages (0..7)
    # b shares 6 tokens with a: one full cached page and a copied partial page.
    b = Sequence("b", list(range(6)) + [50, 51, 52], params)
    assert kv.match_prefix(b) == 6 and len(kv._copies) == 1
    b.num_computed_tokens = 6  # what the scheduler does with the match
    for layer in range(LAYERS):  # b's reference KV for the shared prefix is a's
        ks, vs = ref[(a.seq_id, layer)]
        ref[(b.seq_id, layer)] = (ks[:6], vs[:6])
    a.token_ids.append(98)
    _run_step(backend, kv, [(a, 1), (b, 3)], ref, gen)  # a decode and a chunk on a cached prefix together
    kv.release(a, True)
    kv.release(b, True)
    kv.flush()
    assert kv.num_free_pages() == 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks")
def test_auto_picks_sdpa_on_cpu_and_flashinfer_fails_clearly():
    from nanoslg.cache.auto import CPU_DEFAULT, resolve_backend
    from nanoslg.cache.flashinfer_backend import FlashInferBackend
    from nanoslg.core.config import CacheConfig
    from nanoslg.core.errors import ConfigError

    assert resolve_backend(CacheConfig(backend="auto"), torch.device("cpu")) == (
        CPU_DEFAULT,
        f"auto on CPU: {CPU_DEFAULT}",
    )
    assert resolve_backend(CacheConfig(backend="paged"), torch.device("cpu"))[0] == "paged"
    with pytest.raises(ConfigError, match="cache.backend=flashinfer cannot run here: no CUDA device"):
        FlashInferBackend(KVSpec(2, 2, 8, torch.bfloat16, torch.device("cpu")), 16)


def test_flashinfer_decode_kernel_choice():
    """auto: tensor cores from a GQA group of 4 (FlashInfer's rule); a setting overrides it."""
    from nanoslg.cache.decode_choice import uses_tensor_cores

    assert [uses_tensor_cores("auto", g) for g in (1, 2, 4, 8)] == [False, False, True, True]
    assert uses_tensor_cores("tensor_cores", 1) and not uses_tensor_cores("cuda_cores", 8)


# -- the engine on CPU with cache=paged ---------------------------------------------------------
import gc  # noqa: E402
import random  # noqa: E402

from nanoslg import LLM  # noqa: E402


def shared_prompts(vocab: int, seed: int = 0):
    """A 26-token base; round 2 shares it on a page boundary (16), mid-page (18) and whole."""
    rng = random.Random(seed)
    base = [rng.randrange(3, vocab // 2) for _ in range(26)]

    def own(n):  # from the upper half of the vocabulary: never continues the base by chance
        return [rng.randrange(vocab // 2, vocab) for _ in range(n)]

    warm = [base + own(5), base[:10] + own(9)]
    again = [base[:16] + own(7), base[:18] + own(11), base + own(5), list(base), own(6)]
    return warm, again


def paged_llm(path, *overrides):
    return LLM(f"model.path={path}", "cache=paged", "cache.page_size=4", *overrides)


def run_rounds(path, *overrides):
    with paged_llm(path, *overrides) as llm:
        warm, again = shared_prompts(llm.engine.vocab_size)
        out1 = llm.generate(warm, greedy())
        out2 = llm.generate(again, greedy())
        kv = llm.engine.scheduler.kv
        info = {"kv": kv, "metrics": llm.engine.metrics, "cached": [o.num_cached_tokens for o in out2]}
        kv.flush()
        info["free_after_flush"] = kv.num_free_pages()
    return warm + again, [o.token_ids for o in out1 + out2], info


@pytest.fixture(scope="module")
def uncached(tiny_llama):
    return run_rounds(tiny_llama, "cache.prefix_caching=false")


def test_prefix_hits_full_and_mid_page_equal_uncached_and_transformers(tiny_llama, hf_greedy, uncached):
    prompts, tokens, info = run_rounds(tiny_llama)
    _, plain, plain_info = uncached
    assert tokens == plain
    for p, t in zip(prompts, tokens):
        assert t == hf_greedy(tiny_llama, p, NEW)
    # page-aligned 16, mid-page 18, whole prompt (capped one short), the bare base, no match
    assert info["cached"] == [16, 18, 26, 25, 0]
    assert plain_info["cached"] == [0] * 5
    m = info["metrics"]
    assert m.prefix_cache_hits > 0 and m.prefix_cache_queries == sum(len(p) for p in prompts)
    kv = info["kv"]
    assert info["free_after_flush"] == kv.num_pages and plain_info["free_after_flush"] == kv.num_pages


def test_eviction_under_a_tiny_pool(tiny_llama, hf_greedy, uncached):
    # 40 pages of 4 tokens: each request needs up to 16 pages, so cached prefixes must be evicted
    # (and running sequences preempted) to make room.
    prompts, tokens, info = run_rounds(tiny_llama, "cache.max_num_tokens=160")
    assert tokens == uncached[1]
    assert info["kv"].tree.evicted_pages > 0
    assert info["free_after_flush"] == info["kv"].num_pages
    for p, t in zip(prompts[:2], tokens[:2]):
        assert t == hf_greedy(tiny_llama, p, NEW)


def test_chunked_prefill_on_a_cached_prefix(tiny_llama, uncached):
    prompts, tokens, info = run_rounds(tiny_llama, "scheduler.max_num_batched_tokens=7")
    assert tokens == uncached[1]
    assert info["cached"] == [16, 18, 26, 25, 0]
    assert info["free_after_flush"] == info["kv"].num_pages


@pytest.mark.parametrize("overlap", ["true", "false"])
def test_a_running_prompt_is_cached_as_soon_as_computed(tiny_llama, hf_greedy, overlap):
    """A request arriving while another decodes hits that prompt's full pages at once (the prompt
    ends mid-page, so decoding crosses no page boundary for a while)."""
    from nanoslg.engine.stream import collect

    async def run(engine, a, b):
        first = engine.add_request(a, greedy())
        await first.__anext__()  # a's prompt is computed and a decodes
        second = await collect(engine.add_request(b, greedy()))
        return second

    with paged_llm(tiny_llama, f"scheduler.overlap={overlap}") as llm:
        rng = random.Random(5)
        a = [rng.randrange(3, llm.engine.vocab_size) for _ in range(10)]  # 2 full pages of 4, and 2
        b = a[:8] + [rng.randrange(3, llm.engine.vocab_size) for _ in range(3)]
        out = llm._call(run(llm.engine, a, b))
    assert out.num_cached_tokens == 8
    assert out.token_ids == hf_greedy(tiny_llama, b, NEW)


@pytest.mark.parametrize("overlap", ["true", "false"])
def test_a_shared_prefix_is_computed_once_per_step(tiny_llama, hf_greedy, overlap):
    """A burst sharing a prefix: the first request computes it; the others wait a step and hit it
    rather than computing it again in the same step."""
    with paged_llm(tiny_llama, f"scheduler.overlap={overlap}") as llm:
        ex = llm.engine.executor
        launch, fed = ex.launch, []
        ex.launch = lambda plan: fed.append(plan.num_tokens) or launch(plan)
        rng = random.Random(6)
        base = [rng.randrange(3, llm.engine.vocab_size) for _ in range(24)]
        prompts = [base + [rng.randrange(3, llm.engine.vocab_size) for _ in range(3)] for _ in range(8)]
        outs = llm.generate(prompts, greedy())
    assert [o.num_cached_tokens for o in outs] == [0] + [24] * 7
    # Prompts once (the base once), then one token per decode; overlap may add one wasted step per request.
    assert 27 + 7 * 3 + 8 * (NEW - 1) <= sum(fed) <= 27 + 7 * 3 + 8 * NEW
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(tiny_llama, p, NEW)


def test_qwen3_paged_prefix_caching_equals_transformers(tiny_qwen3, hf_greedy):
    prompts, tokens, info = run_rounds(tiny_qwen3)
    for p, t in zip(prompts, tokens):
        assert t == hf_greedy(tiny_qwen3, p, NEW)
    assert sum(info["cached"]) > 0


# -- GPU: FlashInfer against SDPA on real shapes with dummy weights ------------------------------
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_NEW = 256


def _gpu_run(model: str, backend: str, *extra: str):
    base = [
        f"model={model}",
        "model.load_format=dummy",
        "model.seed=0",
        "model.max_model_len=2048",
        "cache.max_num_tokens=32768",
        f"cache={backend}",
        *extra,
    ]
    with LLM(*base) as llm:
        rng = random.Random(1)
        vocab = llm.engine.vocab_size
        shared = [rng.randrange(3, vocab) for _ in range(300)]
        prompts = [shared + [rng.randrange(3, vocab) for _ in range(n)] for n in (5, 40, 200)]
        prompts.append([rng.randrange(3, vocab) for _ in range(77)])
        # The first request runs alone, so with prefix caching the others reuse its 300-token prefix.
        outs = llm.generate(prompts[:1], greedy(GPU_NEW, logprobs=5))
        outs += llm.generate(prompts[1:], greedy(GPU_NEW, logprobs=5))
        info = dict(llm.engine.info, cached=[o.num_cached_tokens for o in outs])
    gc.collect()
    torch.cuda.empty_cache()
    info["first_top"] = [dict(o.outputs[0].logprobs[0].top) for o in outs]  # token -> logprob, top 5
    return [o.token_ids for o in outs], [[lp.logprob for lp in o.outputs[0].logprobs] for o in outs], info


def _compare(a, b):
    """Match rate over all tokens, agreeing prefix lengths, and the max logprob difference while they agree."""
    (ta, la), (tb, lb) = a, b
    total = sum(len(x) for x in ta)
    rate = sum(x == y for p, q in zip(ta, tb) for x, y in zip(p, q)) / total
    prefixes, diff = [], 0.0
    for p, q, lp, lq in zip(ta, tb, la, lb):
        k = next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p))
        prefixes.append(k)
        diff = max([diff] + [abs(x - y) for x, y in zip(lp[:k], lq[:k])])
    return rate, prefixes, diff


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("model", ["llama3-8b", "qwen3-0.6b"])
def test_gpu_flashinfer_matches_sdpa(model):
    pytest.importorskip("flashinfer")
    fi_tokens, fi_lps, info = _gpu_run(model, "flashinfer")
    assert info["cache_backend"] == "flashinfer"
    sd_tokens, sd_lps, sd_info = _gpu_run(model, "sdpa")
    rate, prefixes, diff = _compare((fi_tokens, fi_lps), (sd_tokens, sd_lps))
    print(
        f"\n{model}: flashinfer vs sdpa greedy match rate {rate:.1%} over {GPU_NEW} tokens x "
        f"{len(fi_tokens)} prompts; agreeing prefixes {prefixes}; max logprob diff {diff:.4f}"
    )
    # Dummy weights give flat logits (std ~1.3 over 128k tokens: top-1 and top-2 are ~0.25 apart),
    # so bf16 rounding flips greedy picks and the match rate is reported, not asserted. What must
    # hold is the distribution: at the first token each backend's top pick is in the other's top 5,
    # with the same logprob there.
    first_diff = 0.0
    for fi_top, sd_top in zip(info["first_top"], sd_info["first_top"]):
        fi_best, sd_best = max(fi_top, key=fi_top.get), max(sd_top, key=sd_top.get)
        assert fi_best in sd_top and sd_best in fi_top, (fi_top, sd_top)
        first_diff = max([first_diff] + [abs(fi_top[t] - sd_top[t]) for t in fi_top.keys() & sd_top.keys()])
    print(f"{model}: max first-token top-5 logprob diff {first_diff:.4f}")
    assert first_diff < 0.25 and diff < 0.25


@pytest.mark.gpu
@GPU
def test_gpu_flashinfer_prefix_caching_on_off_identical():
    pytest.importorskip("flashinfer")
    on, on_lps, on_info = _gpu_run("qwen3-0.6b", "flashinfer")
    off, off_lps, off_info = _gpu_run("qwen3-0.6b", "flashinfer", "cache.prefix_caching=false")
    assert on_info["cached"] == [0, 300, 300, 0] and off_info["cached"] == [0] * 4
    rate, prefixes, diff = _compare((on, on_lps), (off, off_lps))
    print(
        f"\nqwen3-0.6b flashinfer prefix caching on vs off: match rate {rate:.1%}; agreeing prefixes "
        f"{prefixes}; max logprob diff {diff:.4f}"
    )
    # Cached KV was computed in another batch than the recomputed one; in bf16 the GEMMs may round
    # differently by batch size, so equality is asserted on the leading tokens and reported overall.
    assert all(k >= 32 for k in prefixes), prefixes
