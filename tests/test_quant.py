"""Quantized linear layers (nanoslg/model/quant/) on the CPU, against transformers.

Each method loads a tiny checkpoint that the tests' own quantizer (tests/quant_ckpt.py) wrote; the
reference is transformers on the DEQUANTIZED weights saved as a float32 checkpoint, in single, tp=2
and pp=2.

- AWQ: the engine dequantizes exactly what transformers runs: its greedy tokens equal `generate`'s.
- FP8: the engine also rounds each linear layer's input to float8 per token, and so does the
  reference: a forward pre-hook on every nn.Linear but the LM head (`fake_quant_act`; under tp=2 the
  hooks of o_proj and down_proj round each half of the features with its own scale, as each rank of
  a row-parallel layer does, as in vLLM). Same math, but not the same float32 summation order (a
  fused q/k/v matmul against three, attention kernels), and float8 rounding is a step function: a
  last-bit difference that moves one value across a rounding boundary moves it by a float8 step,
  which moves more values across boundaries downstream. The two drift apart by about a tenth of a
  nat in the logits, so on a random tiny model the greedy paths part at the first near tie. The
  assertion is therefore teacher-forced: transformers (with the hook) scores the engine's own
  tokens, every one must be within FP8_GAP of its argmax, and at least FP8_AGREE of them must be the
  argmax itself. A wrong scale, a misplaced shard or a bad rounding is off by whole nats.
"""

import json
import os
import random
import shutil

import pytest
import torch
from quant_ckpt import fake_quant_act, make_awq, make_fp8
from safetensors.torch import load_file, save_file

from nanoslg import LLM, SamplingParams
from nanoslg.core.compose import compose_config
from nanoslg.core.errors import ConfigError
from nanoslg.model.hf_config import load_args
from nanoslg.model.loader import load_model, weight_bytes
from nanoslg.runtime.build import stored_bytes

NEW = 24
GROUP = 32  # divides every layer's inputs of the tiny models, also a tp=2 shard's
FP8_GAP = 0.5  # nats below the reference's argmax an engine token may fall (a near tie under fp8 drift)
FP8_AGREE = 0.9  # the share of engine tokens that must be the reference's argmax
MODES = {"single": [], "tp": ["parallel=tp", "parallel.tp_size=2"], "pp": ["parallel=pp", "parallel.pp_size=2"]}


def prompts_for(vocab: int, lengths=(3, 11, 26, 41), seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def greedy(n=NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def hf_model(path: str, fake_quant: bool = False, tp: int = 1):
    """transformers in float32 (no EOS). fake_quant: FP8 activations as the engine rounds them,
    row-parallel layers' inputs in `tp` slices."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None
    if fake_quant:
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                parts = tp if name.endswith(("o_proj", "down_proj")) else 1
                mod.register_forward_pre_hook(lambda _, args, parts=parts: (fake_quant_act(args[0], parts),))
    return m


def hf_generate(m, prompts: list[list[int]], n: int = NEW) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = m.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, pad_token_id=0
            )
            out.append(gen[0, len(p) :].tolist())
    return out


def hf_gaps(m, prompt: list[int], tokens: list[int]) -> list[float]:
    """Teacher-forced on the engine's tokens: how far (nats) each falls below the reference's argmax."""
    with torch.no_grad():
        logits = m(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
    lp = torch.log_softmax(logits.float(), -1)
    return (lp.max(-1).values - lp[torch.arange(len(tokens)), torch.tensor(tokens)]).tolist()


def check_fp8(m, prompts, outs, what: str) -> None:
    gaps = [g for p, toks in zip(prompts, outs) for g in hf_gaps(m, p, toks)]
    agree = sum(g == 0 for g in gaps) / len(gaps)
    print(f"{what}: {agree:.0%} of greedy tokens are the reference's argmax; the largest gap {max(gaps):.3f} nats")
    assert max(gaps) < FP8_GAP and agree >= FP8_AGREE, (what, agree, max(gaps))


@pytest.fixture(scope="module")
def quantized(tiny_llama, tmp_path_factory):
    """name -> (engine overrides, the dequantized float32 checkpoint)."""
    root = str(tmp_path_factory.mktemp("quant"))
    cases = {}
    for mode in ("float", "tensor", "channel"):
        ckpt, ref = make_fp8(tiny_llama, root, f"fp8-{mode}", mode)
        extra = ["model.quantization=fp8"] if mode == "float" else []  # a float checkpoint asks for it
        cases[f"fp8-{mode}"] = ([f"model.path={ckpt}", *extra], ref)
    ckpt, ref = make_awq(tiny_llama, root, "awq", GROUP)
    cases["awq"] = ([f"model.path={ckpt}"], ref)
    return prompts_for(load_args(tiny_llama).vocab_size), cases


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", ["fp8-float", "fp8-tensor", "fp8-channel", "awq"])
def test_engine_against_transformers_on_dequantized_weights(case, mode, quantized):
    prompts, cases = quantized
    overrides, ref = cases[case]
    with LLM(*overrides, "cache=sdpa", "scheduler.max_num_batched_tokens=16", *MODES[mode]) as llm:
        outs = [o.token_ids for o in llm.generate(prompts, greedy())]
        assert llm.engine.info["quantization"] == case.split("-")[0]
    if case == "awq":
        assert outs == hf_generate(hf_model(ref), prompts), f"awq {mode}: greedy tokens differ from transformers"
    else:
        check_fp8(hf_model(ref, fake_quant=True, tp=2 if mode == "tp" else 1), prompts, outs, f"{case} {mode}")


@pytest.mark.parametrize("kind", ["tiny_qwen2", "tiny_qwen3"])
def test_awq_with_biases_and_qk_norm(kind, request, tmp_path):
    """Qwen2's q/k/v biases stay float beside the int4 weights; Qwen3's tied head stays unquantized."""
    src = request.getfixturevalue(kind)
    ckpt, ref = make_awq(src, str(tmp_path), "awq", GROUP)
    prompts = prompts_for(load_args(src).vocab_size)[1:3]
    with LLM(f"model.path={ckpt}", "cache=sdpa") as llm:
        outs = [o.token_ids for o in llm.generate(prompts, greedy())]
    assert outs == hf_generate(hf_model(ref), prompts)


def test_layers_hold_what_the_method_stores(tiny_llama, tmp_path):
    """Norms, embeddings and the LM head stay float; the linears hold int4 (AWQ) or float8 (FP8); the
    bytes the roofline is told are what the model holds."""
    awq, _ = make_awq(tiny_llama, str(tmp_path), "awq", GROUP)
    for path, quant in ((awq, "none"), (tiny_llama, "fp8")):
        m = load_model(path, quantization=quant)
        layer = m.model.layers["0"]
        assert m.lm_head.weight.dtype == m.model.embed_tokens.weight.dtype == torch.float32
        assert layer.input_layernorm.weight.dtype == torch.float32
        qkv = layer.self_attn.qkv_proj
        if m.quant.name == "awq":
            assert qkv.qweight.dtype == torch.int32 and qkv.qweight.shape == (64 // 8, 128)
            assert qkv.zeros.dtype == torch.uint8 and qkv.scales.dtype == torch.float16
        else:
            assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.shape == (128,)
        total, per_step = weight_bytes(m.args, m.quant, 4)
        assert stored_bytes(m) == total and per_step == total - 512 * 64 * 4  # untied input table


@pytest.mark.parametrize("quant", ["awq", "fp8"])
def test_dummy_weights_of_the_real_shapes(quant, tiny_llama, clean_parallel_state):
    """load_format=dummy draws random quantized weights (model.quantization names the method); a tp=2
    rank holds the slice of the same draws."""
    from test_model_equivalence import run

    from nanoslg.core.dist import ParallelState

    args = load_args(tiny_llama)
    if quant == "awq":  # the shapes of an AWQ checkpoint's config.json (the default group, 128, is too big here)
        args.quantization = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True}
    full = load_model(args, load_format="dummy", quantization=quant, seed=1)
    with torch.no_grad():
        assert torch.isfinite(run(full, [5, 6, 7, 8])).all()
    clean_parallel_state.set_state(ParallelState(tp_rank=1, tp_size=2))
    half = load_model(args, load_format="dummy", quantization=quant, seed=1)
    a, b = full.model.layers["1"].mlp, half.model.layers["1"].mlp
    if quant == "awq":  # row-parallel: rank 1 holds the second half of the input rows
        assert torch.equal(b.down_proj.qweight, a.down_proj.qweight[a.down_proj.qweight.shape[0] // 2 :])
        assert torch.equal(b.down_proj.scales, a.down_proj.scales[a.down_proj.scales.shape[0] // 2 :])
    else:  # column-parallel: rank 1 holds the second half of gate's rows and of up's
        rows = torch.cat([a.gate_up_proj.weight[64:128], a.gate_up_proj.weight[192:]])
        assert torch.equal(b.gate_up_proj.weight.view(torch.uint8), rows.view(torch.uint8))


# -- what is refused, and how -------------------------------------------------------------------------
def _edit(src: str, dst, tensors=None, config=None) -> str:
    """A copy of a checkpoint with some tensors replaced (None deletes) and config keys changed."""
    shutil.copytree(src, dst)
    if tensors:
        w = load_file(os.path.join(dst, "model.safetensors"))
        for k, v in tensors.items():
            w.pop(k) if v is None else w.__setitem__(k, v)
        save_file(w, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    if config:
        c = json.load(open(os.path.join(dst, "config.json")))
        c["quantization_config"].update(config)
        json.dump(c, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


@pytest.fixture(scope="module")
def awq_ckpt(tiny_llama, tmp_path_factory):
    return make_awq(tiny_llama, str(tmp_path_factory.mktemp("awq")), "awq", GROUP)[0]


@pytest.fixture(scope="module")
def fp8_ckpt(tiny_llama, tmp_path_factory):
    return make_fp8(tiny_llama, str(tmp_path_factory.mktemp("fp8")), "fp8", "tensor")[0]


def test_malformed_awq_names_the_tensor(awq_ckpt, tmp_path):
    k = "model.layers.1.self_attn.k_proj."
    w = load_file(os.path.join(awq_ckpt, "model.safetensors"))
    wrong_pack = torch.zeros(64, 32 // 4, dtype=torch.int32)  # packed 4 to an int32, not 8
    cases = [
        ({k + "qweight": wrong_pack}, None, r"model\.layers\.1\.self_attn\.k_proj\.qweight: shape \(64, 8\)"),
        ({k + "qweight": w[k + "qweight"].long()}, None, r"k_proj\.qweight: dtype torch\.int64"),
        ({"model.layers.0.mlp.down_proj.scales": None}, None, r"lacks .*model\.layers\.0\.mlp\.down_proj\.scales"),
        ({"model.layers.2.mlp.up_proj.qzeros": None}, None, r"lacks .*model\.layers\.2\.mlp\.up_proj\.qzeros"),
        (None, {"group_size": 48}, r"checkpoint tensor model\.layers\.\d+\.\S+: .* input features .*group_size=48"),
        (None, {"group_size": 20}, r"group_size=20 is not supported"),
        (None, {"bits": 8}, r"bits=8 is not supported"),
        (None, {"version": "gemv"}, r"version='gemv' is not supported; allowed: gemm"),
    ]
    for i, (tensors, config, match) in enumerate(cases):
        with pytest.raises(ConfigError, match=match):
            load_model(_edit(awq_ckpt, tmp_path / str(i), tensors, config))


def test_awq_shards_that_split_a_packed_int_or_a_group_are_refused(awq_ckpt, clean_parallel_state):
    """tp=4: o_proj's 64 inputs give each rank 16, half a group of 32; the error names the tensor."""
    from nanoslg.core.dist import ParallelState

    clean_parallel_state.set_state(ParallelState(tp_rank=0, tp_size=4))
    with pytest.raises(ConfigError, match=r"o_proj\.\w+: .*16 input features .*group_size=32"):
        load_model(awq_ckpt)


def test_malformed_fp8_names_the_tensor(fp8_ckpt, tmp_path):
    q = "model.layers.0.self_attn.q_proj."
    cases = [
        ({q + "weight_scale": None}, None, r"lacks .*model\.layers\.0\.self_attn\.q_proj\.weight_scale"),
        ({q + "weight_scale": torch.ones(3)}, None, r"q_proj\.weight_scale: weight_scale has 3 values"),
        ({q + "weight_scale": torch.ones(64, 2)}, None, r"q_proj\.weight_scale: .* block-wise"),
        ({q + "weight": torch.zeros(64, 64)}, None, r"q_proj\.weight: dtype torch\.float32 where torch\.float8"),
        (None, {"weight_block_size": [128, 128]}, r"weight_block_size=\[128, 128\]: block-wise .* not supported"),
        (None, {"activation_scheme": "weird"}, r"activation_scheme='weird'; allowed: dynamic, static"),
        (None, {"ignored_layers": ["model.layers.0.mlp.down_proj"]}, r"ignored_layers=.*not supported"),
    ]
    for i, (tensors, config, match) in enumerate(cases):
        with pytest.raises(ConfigError, match=match):
            load_model(_edit(fp8_ckpt, tmp_path / str(i), tensors, config))


def test_method_mismatch_and_bad_names(awq_ckpt, tiny_llama):
    with pytest.raises(ConfigError, match=r"model\.quantization=fp8 does not match .*quant_method='awq'"):
        load_model(awq_ckpt, quantization="fp8")
    with pytest.raises(ConfigError, match=r"model\.quantization=awq needs an AWQ checkpoint"):
        load_model(tiny_llama, quantization="awq")
    assert load_model(awq_ckpt, quantization="awq").quant.name == "awq"  # naming the checkpoint's own is fine
    with pytest.raises(ConfigError, match=r"model\.quantization='int8' is not allowed; allowed: none, awq, fp8"):
        compose_config(["model.quantization=int8"])
    with pytest.raises(ConfigError, match=r"cache\.kv_dtype='fp8' is not allowed; allowed: auto, fp8_e4m3"):
        compose_config(["cache.kv_dtype=fp8"])


def test_static_activation_scales(fp8_ckpt, tmp_path):
    """activation_scheme static: one input scale per layer (the largest of a fused layer's shards)."""
    w = load_file(os.path.join(fp8_ckpt, "model.safetensors"))
    scales = {k.replace(".weight_scale", ".input_scale"): torch.tensor(0.05) for k in w if k.endswith("weight_scale")}
    scales["model.layers.0.self_attn.k_proj.input_scale"] = torch.tensor(0.07)
    m = load_model(_edit(fp8_ckpt, tmp_path / "static", scales, {"activation_scheme": "static"}))
    qkv = m.model.layers["0"].self_attn.qkv_proj
    assert qkv.act_scale.item() == pytest.approx(0.07)
    x = torch.randn(3, 64)
    ref = (torch.clamp(x / 0.07, -448, 448).to(torch.float8_e4m3fn).float() * 0.07) @ (
        qkv.weight.float() * qkv.weight_scale[:, None]
    ).t()
    torch.testing.assert_close(qkv(x), ref, atol=1e-4, rtol=1e-4)


def test_the_mlp_runs_the_methods_own_kernels(tiny_llama, monkeypatch):
    """MLP.forward takes the method's apply_mlp product where it gives one (FP8's one-row kernels on a
    GPU), then down's reduce; where it gives None (the torch path here) gate_up, the activation and down."""
    m = load_model(tiny_llama, quantization="fp8")
    mlp, x = m.model.layers["0"].mlp, torch.randn(1, 64)
    assert m.quant.apply_mlp(mlp.gate_up_proj, mlp.down_proj, x) is None
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(mlp(x), mlp.down_proj(torch.nn.functional.silu(gate) * up), atol=1e-5, rtol=1e-5)
    own = torch.full((1, mlp.down_proj.out_features), 3.0)
    monkeypatch.setattr(type(m.quant), "apply_mlp", lambda self, gate_up, down, x: own)
    assert torch.equal(mlp(x), own)
