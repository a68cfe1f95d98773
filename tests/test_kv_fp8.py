"""An FP8 KV cache (`cache.kv_dtype=fp8_e4m3`) on the CPU backends (sdpa, paged with prefix caching
and cascade attention), against transformers and against the float32-KV run.

The reference is transformers with an attention function that rounds K and V to float8 (divided by
the layer's scale, as the pool stores them) before attending. Float8 rounding turns last-bit
differences between the two into float8 steps downstream (tests/test_quant.py says more), so, as
there, the reference scores the engine's own tokens: every one within FP8_GAP of its argmax, at
least FP8_AGREE of them the argmax itself. Agreement with the float32-KV run is printed; what is
asserted of it is only what holds by construction (the pool holds more tokens; the first tokens).
"""

import random

import pytest
import torch
from quant_ckpt import E4M3_MAX, make_fp8
from test_quant import FP8_AGREE, FP8_GAP, greedy, hf_gaps, prompts_for

from nanoslg import LLM
from nanoslg.cache.kv_quant import FP8, from_cache, to_cache, to_cache_pair
from nanoslg.model.hf_config import load_args

_SCALES: dict[int, tuple[float, float]] = {}  # layer -> (k, v) scale of the reference's FP8 KV


def _fp8_kv_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ks, vs = _SCALES.get(module.layer_idx, (1.0, 1.0))
    key = torch.clamp(key / ks, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(key.dtype) * ks
    value = torch.clamp(value / vs, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(value.dtype) * vs
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def hf_fp8_kv(path: str, scales: dict | None = None, fake_quant_linears: bool = False):
    """transformers (float32) whose attention reads K and V rounded to float8."""
    from test_quant import hf_model
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("nanoslg_fp8_kv", _fp8_kv_attention)
    _SCALES.clear()
    _SCALES.update(scales or {})
    m = hf_model(path, fake_quant=fake_quant_linears) if fake_quant_linears else None
    if m is None:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    m.set_attn_implementation("nanoslg_fp8_kv")
    return m


def check(m, prompts, outs, what: str) -> float:
    gaps = [g for p, toks in zip(prompts, outs) for g in hf_gaps(m, p, toks)]
    agree = sum(g == 0 for g in gaps) / len(gaps)
    print(f"\n{what}: {agree:.0%} of greedy tokens are the FP8-KV reference's argmax; largest gap {max(gaps):.3f}")
    assert max(gaps) < FP8_GAP and agree >= FP8_AGREE, (what, agree, max(gaps))
    return agree


def test_store_and_read_back():
    x = torch.tensor([0.0, 1.0, -3.3, 1000.0, -1e6, 1e-4])
    q = to_cache(x, 1.0, FP8)
    assert q.dtype == FP8 and torch.isfinite(q.float()).all()  # saturated, never NaN
    assert from_cache(q, 1.0, torch.float32).tolist()[:4] == [0.0, 1.0, -3.25, 448.0]
    q2 = to_cache(x, 4.0, FP8)  # stored as x / 4: 1000 fits now
    assert from_cache(q2, 4.0, torch.float32)[3].item() == 1024.0
    assert to_cache(x, 1.0, torch.float32) is x  # a float pool stores as is


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 1.0)])
def test_k_and_v_of_one_qkv_output_convert_as_one(scales):
    """to_cache_pair gives to_cache's bits, whether k and v are adjacent views of a fused qkv output
    (converted together) or not (and with a scale, always apart)."""
    qkv = torch.randn(5, (4 + 2 + 2) * 8, dtype=torch.bfloat16) * 300
    q, k, v = qkv.split([32, 16, 16], dim=-1)
    k, v = k.view(5, 2, 8), v.view(5, 2, 8)
    for a, b in ((k, v), (v, k), (k, k.clone())):
        pk, pv = to_cache_pair(a, b, scales, FP8)
        assert pk.dtype == pv.dtype == FP8 and pk.shape == pv.shape == (5, 2, 8)
        assert torch.equal(pk.view(torch.uint8), to_cache(a, scales[0], FP8).view(torch.uint8))
        assert torch.equal(pv.view(torch.uint8), to_cache(b, scales[1], FP8).view(torch.uint8))


@pytest.mark.parametrize("cache", ["sdpa", "paged"])
def test_fp8_kv_against_transformers_and_float_kv(cache, tiny_llama):
    prompts = prompts_for(load_args(tiny_llama).vocab_size)
    runs, tokens = {}, {}
    for kv in ("auto", "fp8_e4m3"):
        with LLM(
            f"model.path={tiny_llama}", f"cache={cache}", f"cache.kv_dtype={kv}", "scheduler.max_num_batched_tokens=16"
        ) as llm:
            runs[kv] = [o.token_ids for o in llm.generate(prompts, greedy())]
            tokens[kv] = llm.engine.info["kv_tokens"]
            if kv == "fp8_e4m3":
                assert llm.engine.info["kv_dtype"] == "float8_e4m3fn" and llm.engine.info["kv_bytes_per_token"] == 192
                # Prefix caching: a second pass reads its prompts back from the FP8 pool.
                assert [o.token_ids for o in llm.generate(prompts, greedy())] == runs[kv]
    # One byte a value, not four (float32 on the CPU): four times the tokens, up to the last page.
    assert 0 <= tokens["fp8_e4m3"] - 4 * tokens["auto"] < 4 * 16
    check(hf_fp8_kv(tiny_llama), prompts, runs["fp8_e4m3"], f"fp8 KV, {cache}")
    same = sum(a == b for x, y in zip(runs["fp8_e4m3"], runs["auto"]) for a, b in zip(x, y))
    print(f"fp8 KV vs float32 KV ({cache}): {same}/{sum(map(len, runs['auto']))} greedy tokens equal")
    assert all(x[0] == y[0] for x, y in zip(runs["fp8_e4m3"], runs["auto"]))


def test_fp8_kv_under_cascade_attention(tiny_llama):
    """Eight sequences decode over a 272-token cached prefix: the paged backend's cascade path reads
    the shared pages and each sequence's own from the FP8 pool."""
    rng = random.Random(5)
    vocab = load_args(tiny_llama).vocab_size
    base = [rng.randrange(3, vocab) for _ in range(272)]
    prompts = [base + [rng.randrange(3, vocab) for _ in range(n)] for n in range(1, 9)]
    with LLM(f"model.path={tiny_llama}", "cache=paged", "cache.kv_dtype=fp8_e4m3") as llm:
        llm.generate(prompts[:1], greedy(1))  # caches the shared prefix
        outs = [o.token_ids for o in llm.generate(prompts, greedy(6))]
        assert llm.engine.executor.rt.backend.cascade_steps > 0
    check(hf_fp8_kv(tiny_llama), prompts, outs, "fp8 KV, cascade")


@pytest.mark.parametrize("mode", ["single", "tp"])
def test_checkpoint_kv_scales_with_fp8_weights(mode, tiny_llama, tmp_path_factory):
    """An FP8 checkpoint's per-layer k/v scales reach every rank's pool; weights and KV both FP8 (W2)."""
    root = str(tmp_path_factory.mktemp("kvscales"))
    ckpt, ref = make_fp8(tiny_llama, root, "fp8", "tensor", kv_scales=True)
    scales = {i: (0.5 + 0.1 * i, 0.25 + 0.1 * i) for i in range(3)}
    prompts = prompts_for(load_args(tiny_llama).vocab_size)[:3]
    tp = ["parallel=tp", "parallel.tp_size=2"] if mode == "tp" else []
    with LLM(f"model.path={ckpt}", "cache=sdpa", "cache.kv_dtype=fp8_e4m3", *tp) as llm:
        outs = [o.token_ids for o in llm.generate(prompts, greedy())]
        got = llm.engine.executor.rt.spec.kv_scales
    assert [x for ks in got for x in ks] == pytest.approx([x for i in range(3) for x in scales[i]])
    m = hf_fp8_kv(ref, scales, fake_quant_linears=True)
    if mode == "tp":  # the reference's row-parallel hooks round each half of their input on its own
        from quant_ckpt import fake_quant_act

        for name, mod in m.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                mod._forward_pre_hooks.clear()
                mod.register_forward_pre_hook(lambda _, args: (fake_quant_act(args[0], 2),))
    check(m, prompts, outs, f"fp8 weights + fp8 KV with checkpoint scales, {mode}")
