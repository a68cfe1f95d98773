"""Piecewise CUDA graphs (runtime/piecewise.py): the forward cut at its attention calls.

On the CPU the pieces run eagerly on the same fixed buffers and padded buckets the graphs use, so
the cutting, the padding and the runner's path through them are checked against the plain forward
and transformers; the GPU tests capture them and compare with the eager steps.
"""

import pytest
import torch
from conftest import NEW, greedy, prompts_for
from test_gpu import _bf16_llama
from test_model_equivalence import SeqContext, hf_logits, prompt

from nanoslg import LLM
from nanoslg.model.loader import load_model
from nanoslg.runtime import piecewise
from nanoslg.runtime.piecewise import PiecewiseGraphs, auto_max_tokens, buckets_up_to

CHECKPOINTS = ["tiny_llama", "tiny_qwen2", "tiny_qwen3"]  # plain, q/k/v biases, per-head q/k norm


def test_buckets_and_the_auto_size():
    assert buckets_up_to(64) == [16, 24, 32, 48, 64]
    assert buckets_up_to(100) == [16, 24, 32, 48, 64, 96, 100]
    assert buckets_up_to(1024)[7:] == [192, 256, 320, 384, 448, 512, 640, 768, 896, 1024]
    assert buckets_up_to(8192)[-5:] == [4096, 5120, 6144, 7168, 8192] and buckets_up_to(5) == [5]
    # Qwen3-0.6B's 0.75 B parameters take the whole 8,192-token budget, Llama-3.1-8B's 8.0 B 1,024.
    assert auto_max_tokens(8192, 751_632_384) == 8192 and auto_max_tokens(8192, 8_030_261_248) == 1024
    assert auto_max_tokens(512, 751_632_384) == 512


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_pieces_equal_the_forward(name, request):
    """Logits of the pieces (padded to each bucket) against the plain forward and transformers, over
    prefill chunks of several sizes and one-token steps."""
    path = request.getfixturevalue(name)
    model = load_model(path, device="cpu")
    pieces = PiecewiseGraphs(model, 32, torch.device("cpu"))
    ids = prompt(model.args.vocab_size)
    ctx_a, ctx_b, outs, start = SeqContext(), SeqContext(), [], 0
    with torch.no_grad():
        for n in [13, 20, 1, 1, 4, 1]:  # buckets 16, 24, 16, 16, 16, 16
            pos = torch.arange(start, start + n)
            x = torch.tensor(ids[start : start + n])
            got = model.compute_logits(pieces.run(x, ctx_a.step(pos)))
            want = model.compute_logits(model(x, pos, ctx_b.step(pos)))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            outs.append(got)
            start += n
    torch.testing.assert_close(torch.cat(outs), hf_logits(path, ids[:start]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen3"])
def test_engine_through_pieces_equals_transformers(name, request, hf_greedy):
    """The runner sends every step decode graphs do not take through the pieces (on the CPU: every
    step, decode included): chunked prefill, mixed steps and prefix caching give transformers' tokens."""
    path = request.getfixturevalue(name)
    with LLM(f"model.path={path}", "cache=paged", "scheduler.max_num_batched_tokens=24") as llm:
        runner = llm.engine.executor.rt.runner
        assert runner.pieces is None and "no CUDA graphs on cpu" in llm.engine.executor.rt.piecewise_why
        runner.pieces = PiecewiseGraphs(runner.model, 24, torch.device("cpu"))
        calls, run = [], runner.pieces.run
        runner.pieces.run = lambda ids, ctx: calls.append(ids.shape[0]) or run(ids, ctx)
        prompts = prompts_for(llm.engine.vocab_size)
        prompts.append(prompts[-1][:30] + prompts[0])  # a cached prefix, then its own tokens
        outs = llm.generate(prompts, greedy())
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(path, p, NEW), f"{name}: prompt of {len(p)} tokens differs"
    assert max(calls) == 24 and min(calls) < 16  # full chunks, and decode steps padded to a bucket


def test_verify_steps_through_pieces_equal_transformers(tiny_llama, hf_greedy):
    """Speculative decoding's verify steps (several tokens a sequence, every row sampled) through the
    pieces: transformers' tokens, with proposals made and checked."""
    with LLM(f"model.path={tiny_llama}", "cache=paged", "speculative=ngram", "speculative.num_tokens=3") as llm:
        runner = llm.engine.executor.rt.runner
        runner.pieces = PiecewiseGraphs(runner.model, 32, torch.device("cpu"))
        base = prompts_for(llm.engine.vocab_size, lengths=(6, 9))
        prompts = [p * 4 for p in base]  # repeated text: prompt lookup finds proposals
        outs = llm.generate(prompts, greedy())
        assert llm.engine.metrics.spec_num_drafts > 0 and runner.pieces.steps > 0
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(tiny_llama, p, NEW)


def test_the_choice_names_why(tiny_llama):
    with LLM(f"model.path={tiny_llama}", "cache=sdpa", "model.piecewise_graphs=off") as llm:
        assert llm.engine.executor.rt.piecewise_why == "model.piecewise_graphs=off"
    assert piecewise.unavailable() is None  # this torch can hold a piece's outputs without owning them


# -- GPU -----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "kind, cache, overlap",
    [
        ("llama", "flashinfer", "true"),
        ("qwen3", "flashinfer", "true"),
        ("qwen3", "flashinfer", "false"),
        ("llama", "sdpa", "true"),
    ],
)
def test_piecewise_graphs_change_no_token(tmp_path_factory, kind, cache, overlap):
    """Captured pieces against eager steps: prompts of 3 to 700 tokens in chunks of up to 256
    (buckets 16 to 256 and mixed steps), a shared prefix (prefix caching), with and without overlap."""
    ckpt = _bf16_llama(tmp_path_factory.mktemp("pw"), 2, kind, max_len=2048)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (3, 17, 40, 90, 130, 300, 700)]
    prompts.append(prompts[-1][:400] + prompts[1])
    runs, replays = {}, {}
    for mode in ("off", "auto"):
        with LLM(
            f"model.path={ckpt}",
            f"cache={cache}",
            f"model.piecewise_graphs={mode}",
            f"scheduler.overlap={overlap}",
            "scheduler.max_num_batched_tokens=256",
            "cache.max_num_tokens=16384",
        ) as llm:
            runner = llm.engine.executor.rt.runner
            assert (runner.pieces is None) == (mode == "off")
            if runner.pieces is not None:
                assert runner.pieces.max_tokens == 256 and len(runner.pieces.pieces) == len(runner.pieces.buckets)
            outs = llm.generate(prompts, greedy(24))
            runs[mode], replays[mode] = [o.token_ids for o in outs], runner.pieces.steps if runner.pieces else 0
    assert replays["auto"] >= 4  # every prefill step went through the pieces
    assert runs["auto"] == runs["off"]
