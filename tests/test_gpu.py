"""GPU checks in bf16 (skipped without CUDA): the engine against transformers, and the fused kernels
against their torch twins."""
import pytest
import torch

from nanoslg import LLM, SamplingParams
from nanoslg.model import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _bf16_llama(root, kv_heads: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=kv_heads, head_dim=128, vocab_size=1024, max_position_embeddings=1024,
                      initializer_range=0.1)
    path = root / f"llama-kv{kv_heads}"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    """A random Llama with head_dim 128 and GQA 2 (the kernel variants Qwen3-0.6B also uses)."""
    return _bf16_llama(tmp_path_factory.mktemp("bf16"), kv_heads=2)


@pytest.fixture(scope="module")
def bf16_llama_gqa4(tmp_path_factory):
    """GQA 4 (one KV head for four query heads): decode takes FlashInfer's tensor-core path, as Llama-3.1-8B."""
    return _bf16_llama(tmp_path_factory.mktemp("bf16"), kv_heads=1)


@pytest.mark.parametrize("cache", ["flashinfer", "sdpa"])
def test_bf16_greedy_and_logprobs_match_transformers(bf16_llama, cache):
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (5, 37, 130)]
    with LLM(f"model.path={bf16_llama}", f"cache={cache}", "model.enforce_eager=true") as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1))
    hf = AutoModelForCausalLM.from_pretrained(bf16_llama, dtype=torch.bfloat16).cuda().eval()
    hf.generation_config.eos_token_id = None
    for p, out in zip(prompts, outs):
        ids = torch.tensor([p], device="cuda")
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                          pad_token_id=0)[0, len(p):].tolist()
        assert out.token_ids[:4] == ref[:4]  # bf16: the first tokens must agree
        with torch.no_grad():
            lp = torch.log_softmax(hf(ids).logits[0, -1].float(), -1)
        assert abs(out.outputs[0].logprobs[0].logprob - lp[out.token_ids[0]].item()) < 0.1


def test_fused_kernels_equal_torch():
    torch.manual_seed(0)
    x = torch.randn(37, 512, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.rand(512, device="cuda", dtype=torch.bfloat16) + 0.5
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), kernels.rms_norm_torch(x, w, 1e-6), **tol)
    a, ra = kernels.add_rms_norm(x.clone(), r.clone(), w, 1e-6)
    ra_ref = x + r
    torch.testing.assert_close(ra, ra_ref, **tol)
    torch.testing.assert_close(a, kernels.rms_norm_torch(ra_ref, w, 1e-6), **tol)
    gu = torch.randn(37, 1024, device="cuda", dtype=torch.bfloat16)
    kernels.set_fused(False)
    ref = kernels.silu_and_mul(gu)
    kernels.set_fused(True)
    torch.testing.assert_close(kernels.silu_and_mul(gu), ref, **tol)
    pos = torch.randint(0, 1000, (37,), device="cuda")
    inv = 1.0 / (10000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    freqs = torch.outer(torch.arange(1024, device="cuda").float(), inv)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), -1)
    q = torch.randn(37, 4, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(37, 2, 128, device="cuda", dtype=torch.bfloat16)
    qr, kr = kernels.rope_torch(pos, q, k, cos_sin)
    qf, kf = kernels.rope(pos, q.clone(), k.clone(), cos_sin)
    torch.testing.assert_close(qf, qr, **tol)
    torch.testing.assert_close(kf, kr, **tol)


@pytest.mark.parametrize("ckpt", ["bf16_llama", "bf16_llama_gqa4"])
def test_flashinfer_equals_sdpa_on_a_decisive_model(ckpt, request):
    """Random weights with decisive logits: the two backends must pick the same greedy tokens."""
    bf16_llama = request.getfixturevalue(ckpt)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (9, 64, 300)]
    runs = {}
    for cache in ("flashinfer", "sdpa"):
        with LLM(f"model.path={bf16_llama}", f"cache={cache}", "model.enforce_eager=true",
                 "cache.max_num_tokens=8192") as llm:
            runs[cache] = [o.token_ids for o in llm.generate(prompts, SamplingParams(
                temperature=0, max_tokens=32, ignore_eos=True))]
    same = sum(a == b for x, y in zip(runs["flashinfer"], runs["sdpa"]) for a, b in zip(x, y))
    print(f"\nflashinfer vs sdpa on the bf16 random Llama ({ckpt}): {same}/{32 * len(prompts)} greedy tokens equal")
    for x, y in zip(runs["flashinfer"], runs["sdpa"]):
        assert x[:8] == y[:8]


def test_cuda_graphs_change_no_token(bf16_llama):
    """Decode through captured CUDA graphs (padded buckets) gives the eager path's greedy tokens."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (3, 17, 40, 90, 130)] * 4
    runs = {}
    for eager in ("true", "false"):
        with LLM(f"model.path={bf16_llama}", "cache=flashinfer", f"model.enforce_eager={eager}",
                 "cache.max_num_tokens=16384", "scheduler.max_num_seqs=32") as llm:
            assert (llm.engine.executor.rt.runner.graphs is None) == (eager == "true")
            runs[eager] = [o.token_ids for o in llm.generate(prompts, SamplingParams(
                temperature=0, max_tokens=24, ignore_eos=True))]
            runs[eager + "1"] = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=24,
                                                                       ignore_eos=True))[0].token_ids
    assert runs["true"] == runs["false"]
    assert runs["true1"] == runs["false1"]
