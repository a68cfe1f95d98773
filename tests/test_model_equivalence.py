"""The model layer against transformers (CPU, float32): logits, loading, TP slicing, PP stages, sampling,
and the demo checkpoint."""

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nanoslg.cache.backend import CacheContext
from nanoslg.core.dist import ParallelState
from nanoslg.core.errors import ConfigError
from nanoslg.core.plan import NewSeq
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.model.hf_config import ModelArgs, load_args, shape_path
from nanoslg.model.loader import load_model
from nanoslg.model.sampler import Sampler

CHECKPOINTS = ["tiny_llama", "tiny_llama_tied", "tiny_llama3_rope", "tiny_qwen2", "tiny_qwen3"]


class SeqContext(CacheContext):
    """Test-only: one sequence; keeps every layer's k/v and attends causally with SDPA."""

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.positions = None

    def step(self, positions: torch.Tensor) -> "SeqContext":
        self.positions = positions
        return self

    def attend(self, layer, q, k, v):
        if layer in self.kv:
            k, v = torch.cat([self.kv[layer][0], k]), torch.cat([self.kv[layer][1], v])
        self.kv[layer] = (k, v)
        t, s = q.shape[0], k.shape[0]
        mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)  # query i sits at key s - t + i
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
        )
        return o.transpose(0, 1)


def run(model, ids: list[int], chunks=None) -> torch.Tensor:
    """Logits [T, V] for every position, feeding the prompt in chunks (default: all at once)."""
    ctx, out, start = SeqContext(), [], 0
    for n in chunks or [len(ids)]:
        pos = torch.arange(start, start + n)
        hidden = model(torch.tensor(ids[start : start + n]), pos, ctx.step(pos))
        out.append(model.compute_logits(hidden))
        start += n
    return torch.cat(out)


def hf_logits(path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def prompt(vocab: int, n: int = 40, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, vocab) for _ in range(n)]


# -- equivalence ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_logits_equal_transformers(name, request):
    path = request.getfixturevalue(name)
    model = load_model(path, device="cpu")
    ids = prompt(model.args.vocab_size)
    ref = hf_logits(path, ids)
    with torch.no_grad():
        full = run(model, ids)
        chunked = run(model, ids, [13, 20, 1, 1, 1, 1, 1, 1, 1])  # prefill chunks, then decode steps
    assert full.dtype == torch.float32 and full.shape == ref.shape
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked, ref, atol=1e-4, rtol=1e-4)
    assert (ref.topk(2).values[:, 0] - ref.topk(2).values[:, 1]).min() > 1e-3  # decisive: no greedy ties


def test_llama3_scaling_matters(tiny_llama3_rope):
    from nanoslg.model.layers import rope_inv_freq

    args = load_args(tiny_llama3_rope)
    assert args.rope_scaling["rope_type"] == "llama3" and args.rope_theta == 500000.0
    assert not torch.allclose(
        rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling),
        rope_inv_freq(args.head_dim, args.rope_theta, None),
    )


def test_args_parse_both_transformers_layouts(tiny_qwen3):
    with open(os.path.join(tiny_qwen3, "config.json")) as f:
        c5 = json.load(f)
    assert "rope_parameters" in c5  # written by transformers 5
    c4 = {k: v for k, v in c5.items() if k not in ("rope_parameters", "dtype")}
    c4.update(rope_theta=c5["rope_parameters"]["rope_theta"], rope_scaling=None, torch_dtype="bfloat16")
    a5, a4 = ModelArgs.from_dict(c5), ModelArgs.from_dict(c4)
    assert a4.rope_theta == a5.rope_theta and a4.rope_scaling is None and a5.rope_scaling is None
    assert a5.qk_norm and a5.tie_word_embeddings and a5.head_dim == 32 and a4.torch_dtype == torch.bfloat16
    c4["rope_scaling"] = {"type": "linear", "factor": 2.0}  # 4.x spelled rope_type as "type"
    assert ModelArgs.from_dict(c4).rope_scaling == {"type": "linear", "factor": 2.0, "rope_type": "linear"}


def test_bundled_shapes():
    a = load_args(shape_path("llama3-8b"))
    assert (
        a.vocab_size,
        a.num_layers,
        a.hidden_size,
        a.intermediate_size,
        a.num_heads,
        a.num_kv_heads,
        a.head_dim,
    ) == (128256, 32, 4096, 14336, 32, 8, 128)
    assert a.rope_theta == 500000.0 and a.rope_scaling["factor"] == 8.0 and a.torch_dtype == torch.bfloat16
    q = load_args(shape_path("qwen3-0.6b"))
    assert (
        q.vocab_size,
        q.num_layers,
        q.hidden_size,
        q.intermediate_size,
        q.num_heads,
        q.num_kv_heads,
        q.head_dim,
    ) == (151936, 28, 1024, 3072, 16, 8, 128)
    assert q.tie_word_embeddings and q.qk_norm and q.rope_theta == 1e6
    q8 = load_args(shape_path("qwen3-8b"))
    assert (q8.vocab_size, q8.num_layers, q8.hidden_size, q8.intermediate_size, q8.num_heads, q8.num_kv_heads) == (
        151936,
        36,
        4096,
        12288,
        32,
        8,
    )
    assert not q8.tie_word_embeddings and q8.qk_norm
    with pytest.raises(ConfigError, match="llama3-8b"):
        shape_path("gpt-5")


def test_config_errors(tiny_llama, tmp_path):
    c = json.load(open(os.path.join(tiny_llama, "config.json")))
    with pytest.raises(ConfigError, match="Qwen3ForCausalLM"):  # lists what is supported
        ModelArgs.from_dict({**c, "architectures": ["GPT2LMHeadModel"]})
    args = ModelArgs.from_dict({**c, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})
    with pytest.raises(ConfigError, match="yarn"):
        load_model(args, load_format="dummy")


# -- loading ----------------------------------------------------------------------------------------
def test_sharded_equals_single(tiny_llama, tokenizer_dir, tmp_path):
    from conftest import make_checkpoint

    sharded = make_checkpoint(tmp_path, "tiny_llama", tokenizer_dir, tie_word_embeddings=False, max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    a, b = load_model(tiny_llama), load_model(sharded)  # same name -> same seed -> same weights
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_missing_weight_is_named(tiny_llama, tmp_path):
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, dst)
    w = load_file(dst / "model.safetensors")
    del w["model.layers.1.self_attn.k_proj.weight"]
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(str(dst))


def test_dummy_load(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    a = load_model(tiny_qwen3, load_format="dummy", seed=3)
    b = load_model(load_args(tiny_qwen3), load_format="dummy", seed=3)
    real = load_model(tiny_qwen3)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), real.parameters()):
        assert p.shape == r.shape and torch.equal(p, q), n
        if n.endswith("norm.weight"):
            assert torch.all(p == 1)
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in hf.parameters())
    bf = load_model(tiny_qwen3, load_format="dummy", dtype="bfloat16")
    assert bf.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(run(bf, prompt(512, 8))).all()


def test_dummy_init_fan_in(tiny_qwen3):
    normal = load_model(tiny_qwen3, load_format="dummy")
    fan_in = load_model(tiny_qwen3, load_format="dummy", dummy_init="fan_in")
    for (n, p), q in zip(normal.named_parameters(), fan_in.parameters()):
        if n.endswith("norm.weight"):
            assert torch.all(q == 1), n
        elif p.numel() >= 4096:  # enough draws for the spread to show
            assert abs(p.std().item() - 0.02) < 0.003, n
            assert abs(q.std().item() - 0.5 / q.shape[-1] ** 0.5) < 0.15 * 0.5 / q.shape[-1] ** 0.5, n
    with pytest.raises(ConfigError, match="model.dummy_init='xavier'.*normal, fan_in"):
        load_model(tiny_qwen3, load_format="dummy", dummy_init="xavier")


def test_tp_shards(tiny_llama, clean_parallel_state):
    """Each rank loads its slice; KV heads are split (tp=2) or replicated (tp=4 > 2 KV heads)."""
    w = load_file(os.path.join(tiny_llama, "model.safetensors"))
    q, k, v = (w[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    hd = 16
    for tp in (2, 4):
        for rank in range(tp):
            clean_parallel_state.set_state(ParallelState(tp_rank=rank, tp_size=tp))
            m = load_model(tiny_llama)
            attn = m.model.layers["0"].self_attn
            nq, kv_head = 4 // tp, rank * 2 // tp
            want = torch.cat(
                [
                    q[rank * nq * hd : (rank + 1) * nq * hd],
                    k[kv_head * hd : (kv_head + 1) * hd],
                    v[kv_head * hd : (kv_head + 1) * hd],
                ]
            )
            assert torch.equal(attn.qkv_proj.weight, want), (tp, rank)
            o = w["model.layers.0.self_attn.o_proj.weight"]
            assert torch.equal(attn.o_proj.weight, o.chunk(tp, dim=1)[rank])
            gate, up = w["model.layers.0.mlp.gate_proj.weight"], w["model.layers.0.mlp.up_proj.weight"]
            assert torch.equal(
                m.model.layers["0"].mlp.gate_up_proj.weight, torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
            )
            emb = m.model.embed_tokens.weight
            assert torch.equal(emb, w["model.embed_tokens.weight"].chunk(tp)[rank])


def test_pipeline_stages_chain(tiny_llama, clean_parallel_state):
    ids = prompt(512, 12)
    full = load_model(tiny_llama)
    clean_parallel_state.set_state(ParallelState(pp_rank=0, pp_size=2, stage_layers=(0, 2)))
    s0 = load_model(tiny_llama)
    clean_parallel_state.set_state(ParallelState(pp_rank=1, pp_size=2, stage_layers=(2, 3)))
    s1 = load_model(tiny_llama)
    assert s0.lm_head is None and s1.model.embed_tokens is None and list(s1.model.layers) == ["2"]
    pos = torch.arange(len(ids))
    ctx0, ctx1 = SeqContext(), SeqContext()
    with torch.no_grad():
        hidden, residual = s0(torch.tensor(ids), pos, ctx0.step(pos))
        out = s1(torch.tensor(ids), pos, ctx1.step(pos), hidden=hidden, residual=residual)
        torch.testing.assert_close(s1.compute_logits(out), run(full, ids), atol=1e-5, rtol=1e-5)
    assert sorted(ctx0.kv) == [0, 1] and sorted(ctx1.kv) == [0]  # local layer indices


def test_tied_head_on_last_stage_only(tiny_qwen3, clean_parallel_state):
    clean_parallel_state.set_state(ParallelState(pp_rank=1, pp_size=2, stage_layers=(1, 3)))
    m = load_model(tiny_qwen3)
    w = load_file(os.path.join(tiny_qwen3, "model.safetensors"))
    assert torch.equal(m.lm_head.weight, w["model.embed_tokens.weight"])


# -- sampler ---------------------------------------------------------------------------------------
def make_sampler(params: list[SamplingParams], prompt_ids=(1, 2, 3), stop_ids=(), ids=None) -> Sampler:
    s = Sampler("cpu")
    for i, p in enumerate(params):
        s.add(NewSeq(ids[i] if ids else i, p, list(prompt_ids), [], list(stop_ids)))
    return s


def test_seeded_sampling_ignores_batch_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=1234)

    def draws(rows, params, seq_ids):
        s = make_sampler(params, ids=seq_ids)
        return [s.sample(logits[rows], seq_ids)[0] for _ in range(20)]

    alone = [d[0] for d in draws([1], [sp], [7])]
    in_batch = [
        d[1] for d in draws([0, 1, 2], [SamplingParams(temperature=1.0), sp, SamplingParams(seed=5)], [3, 7, 9])
    ]
    other = [d[0] for d in draws([1], [SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=99)], [7])]
    assert alone == in_batch and alone != other


def test_same_seed_same_stream_per_sequence():
    """Each sequence owns its generator: equal seeds give equal streams, other seeds differ.
    (The engine gives child i of an n>1 request seed + i; tests/test_engine.py checks that.)"""
    s = Sampler()
    for i, seed in enumerate((11, 11, 12)):
        s.add(NewSeq(i, SamplingParams(temperature=1.0, seed=seed), [1], [], []))
    rows = [s.sample(torch.zeros(3, 1000), [0, 1, 2])[0] for _ in range(5)]
    streams = [tuple(r[i] for r in rows) for i in range(3)]
    assert streams[0] == streams[1] and streams[0] != streams[2]


def test_samples_follow_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 4000
    for params, probs in [
        (SamplingParams(temperature=1.0), logits.softmax(0)),
        (SamplingParams(temperature=0.5), (logits / 0.5).softmax(0)),
        (SamplingParams(temperature=1.0, top_k=2), logits[:2].softmax(0).tolist() + [0, 0]),
        (SamplingParams(temperature=1.0, top_p=0.7), logits[:2].softmax(0).tolist() + [0, 0]),  # p0=.64
        (SamplingParams(temperature=1.0, min_p=0.3), logits[:2].softmax(0).tolist() + [0, 0]),  # p2/p0=.14
    ]:
        torch.manual_seed(0)
        s = make_sampler([params] * n)
        toks, _ = s.sample(logits.expand(n, 4).clone(), list(range(n)))
        freq = torch.bincount(torch.tensor(toks), minlength=4).float() / n
        assert torch.allclose(freq, torch.as_tensor(probs, dtype=torch.float32), atol=0.03), (params, freq)


def test_top_k_1_and_greedy_agree():
    torch.manual_seed(1)
    logits = torch.randn(6, 300)
    g = make_sampler([SamplingParams(temperature=0.0)] * 6).sample(logits, list(range(6)))[0]
    k1 = make_sampler([SamplingParams(temperature=1.3, top_k=1, seed=i) for i in range(6)]).sample(
        logits, list(range(6))
    )[0]
    mixed = make_sampler([SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * 3).sample(
        logits, list(range(6))
    )[0]
    assert g == logits.argmax(-1).tolist() == k1
    assert mixed[0::2] == g[0::2]


def test_penalties():
    logits = torch.tensor([[3.0, 2.9, -1.0, 0.5]])
    # repetition over the prompt: positive logit divided, negative multiplied
    s = make_sampler([SamplingParams(temperature=0.0, repetition_penalty=2.0)], prompt_ids=[0, 2])
    assert s.sample(logits.clone(), [0])[0] == [1]  # 3.0 / 2 = 1.5 < 2.9
    # frequency over output tokens only: after sampling 0 twice its logit drops by 2 * 1.0
    s = make_sampler([SamplingParams(temperature=0.0, frequency_penalty=1.0)], prompt_ids=[1, 1, 1])
    assert [s.sample(logits.clone(), [0])[0][0] for _ in range(4)] == [0, 1, 0, 1]
    # presence: a flat 0.2 once a token appeared; the prompt does not count
    s = make_sampler([SamplingParams(temperature=0.0, presence_penalty=0.2)], prompt_ids=[0])
    assert [s.sample(logits.clone(), [0])[0][0] for _ in range(3)] == [0, 1, 0]
    # tokens generated before a preemption count
    s = Sampler()
    s.add(NewSeq(0, SamplingParams(temperature=0.0, frequency_penalty=0.5), [3], [0], []))
    assert s.sample(logits.clone(), [0])[0] == [1]


def test_min_tokens_masks_stop_ids():
    logits = torch.tensor([[0.0, 5.0, 1.0]])  # token 1 (the "EOS") dominates
    s = make_sampler([SamplingParams(temperature=0.0, min_tokens=3)], stop_ids=[1])
    assert [s.sample(logits.clone(), [0])[0][0] for _ in range(5)] == [2, 2, 2, 1, 1]
    s = make_sampler([SamplingParams(temperature=1.0, min_tokens=2, seed=0)], stop_ids=[1])
    assert all(s.sample(logits.clone(), [0])[0][0] != 1 for _ in range(2))


def test_logprobs():
    torch.manual_seed(2)
    logits = torch.randn(3, 40)
    s = make_sampler(
        [
            SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=3.0),
            SamplingParams(temperature=0.0),
            SamplingParams(temperature=1.0, logprobs=0, seed=1),
        ]
    )
    toks, lps = s.sample(logits, [0, 1, 2])
    raw = logits.log_softmax(-1)
    assert lps[1] is None and lps[2][1] == [] and lps[2][0] == pytest.approx(raw[2, toks[2]].item())
    chosen, top = lps[0]
    assert chosen == pytest.approx(raw[0, toks[0]].item())  # raw logits, before penalties
    assert [t for t, _ in top] == raw[0].topk(5).indices.tolist()
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    assert torch.exp(raw[0]).sum().item() == pytest.approx(1.0, abs=1e-5)
    s.remove([0, 1, 2])
    assert not s.seqs
    assert make_sampler([SamplingParams(temperature=0.0)]).sample(logits[:1], [0])[1] is None


# -- demo checkpoint --------------------------------------------------------------------------------
def test_demo_checkpoint(demo_model, monkeypatch):
    from transformers import AutoTokenizer

    from nanoslg.model.demo import ensure_demo_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ensure_demo_checkpoint(os.path.dirname(demo_model)) == demo_model  # built once, reused
    tok = AutoTokenizer.from_pretrained(demo_model)
    text = "héllo 世界 — ok 🙂"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    gen = json.load(open(os.path.join(demo_model, "generation_config.json")))
    assert tok.eos_token_id in gen["eos_token_id"] and tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    args = load_args(demo_model)
    assert args.vocab_size == len(tok) and args.architecture == "LlamaForCausalLM"
    model = load_model(demo_model)
    with torch.no_grad():
        torch.testing.assert_close(run(model, ids), hf_logits(demo_model, ids), atol=1e-4, rtol=1e-4)
