"""The engine against transformers: greedy tokens equal `generate`, batched, on CPU in float32.

Chunked prefill and preemption must not change a single token; sampling options behave as the
OpenAI API documents.
"""

import pytest
import torch
from conftest import NEW, greedy, prompts_for

from nanoslg import LLM, SamplingParams
from nanoslg.core.errors import RequestError

CHECKPOINTS = ["tiny_llama", "tiny_llama_tied", "tiny_llama3_rope", "tiny_qwen2", "tiny_qwen3"]


@pytest.fixture(scope="module")
def llama_llm(tiny_llama):
    llm = LLM(f"model.path={tiny_llama}", "cache=sdpa")
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_greedy_equals_transformers(name, request, hf_greedy):
    path = request.getfixturevalue(name)
    with LLM(f"model.path={path}", "cache=sdpa") as llm:
        prompts = prompts_for(llm.engine.vocab_size)
        outs = llm.generate(prompts, greedy())
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(path, p, NEW), f"{name}: prompt of {len(p)} tokens differs"
        assert out.finish_reason == "length"


@pytest.mark.parametrize(
    "overrides",
    [
        ["scheduler.max_num_batched_tokens=7"],  # chunked prefill: every prompt but one spans chunks
        ["cache.max_num_tokens=96", "cache.page_size=8"],  # too little KV for the batch: preemption
        ["scheduler.max_num_seqs=2"],  # a cap on running sequences
        ["scheduler.overlap=false"],  # one step at a time (the default overlaps two)
        ["scheduler.overlap=false", "cache.max_num_tokens=96", "cache.page_size=8"],
    ],
    ids=["chunked", "preempt", "max-seqs", "no-overlap", "no-overlap-preempt"],
)
def test_scheduling_changes_no_token(overrides, tiny_llama, hf_greedy):
    with LLM(f"model.path={tiny_llama}", "cache=sdpa", *overrides) as llm:
        prompts = prompts_for(llm.engine.vocab_size)
        outs = llm.generate(prompts, greedy())
        preemptions = llm.engine.metrics.preemptions
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(tiny_llama, p, NEW)
    if "preempt" in str(overrides):
        assert preemptions > 0, "the KV budget was meant to force preemption"


def test_overlap_feeds_the_token_in_flight(tiny_llama, hf_greedy):
    """With overlap on, decodes are launched before the token they feed has reached the host."""
    from nanoslg.core.plan import PLACEHOLDER

    with LLM(f"model.path={tiny_llama}", "cache=paged", "scheduler.max_num_batched_tokens=16") as llm:
        ex = llm.engine.executor
        launch, fed = ex.launch, []
        ex.launch = lambda plan: fed.append(sum(s.token_ids == [PLACEHOLDER] for s in plan.seqs)) or launch(plan)
        prompts = prompts_for(llm.engine.vocab_size)
        outs = llm.generate(prompts, greedy())
    assert llm.engine.overlap and sum(fed) > NEW  # nearly every decode step fed an in-flight token
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(tiny_llama, p, NEW)


def test_overlap_changes_no_sample(tiny_llama):
    """Penalties, seeded draws, min_tokens and logprobs give the same results with and without overlap."""
    sp = [
        SamplingParams(
            temperature=0.8,
            top_p=0.9,
            seed=5,
            max_tokens=20,
            ignore_eos=True,
            repetition_penalty=1.3,
            frequency_penalty=0.5,
            presence_penalty=0.4,
            logprobs=2,
        ),
        SamplingParams(temperature=0, max_tokens=20, min_tokens=10, repetition_penalty=1.5),
        SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=20, ignore_eos=True),
    ]
    runs = []
    for overlap in ("true", "false"):
        with LLM(f"model.path={tiny_llama}", "cache=sdpa", f"scheduler.overlap={overlap}") as llm:
            outs = llm.generate(prompts_for(llm.engine.vocab_size)[:3], sp)
        runs.append(
            [(o.token_ids, [(lp.token_id, round(lp.logprob, 5)) for lp in o.outputs[0].logprobs or []]) for o in outs]
        )
    assert runs[0] == runs[1]


def test_seeded_sampling_is_reproducible(llama_llm):
    p = prompts_for(llama_llm.engine.vocab_size)
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    a = llama_llm.generate([p[1]], sp)[0].token_ids
    b = llama_llm.generate([p[0], p[1], p[2]], [sp] * 3)[1].token_ids  # other batch neighbours
    c = llama_llm.generate([p[1]], SamplingParams(**{**sp.__dict__, "seed": 99}))[0].token_ids
    assert a == b
    assert a != c


def test_n_samples(llama_llm):
    p = prompts_for(llama_llm.engine.vocab_size)[1]
    out = llama_llm.generate([p], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # independent samples


def test_max_tokens_and_stop_ids(llama_llm):
    p = prompts_for(llama_llm.engine.vocab_size)[2]
    base = llama_llm.generate([p], greedy(20))[0]
    assert len(base.token_ids) == 20 and base.finish_reason == "length"
    stop_tok = base.token_ids[6]
    first = base.token_ids.index(stop_tok)
    out = llama_llm.generate([p], greedy(20, stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == base.token_ids[: first + 1]  # the stop token ends the output, included
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_tok


def test_stop_strings_cut_the_text(llama_llm):
    p = prompts_for(llama_llm.engine.vocab_size)[3]
    base = llama_llm.generate([p], greedy(40))[0]
    text = base.text
    assert len(text) > 12
    stop = text[8:11]
    out = llama_llm.generate([p], greedy(40, stop=[stop, "\x00never"]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]
    assert stop not in out.text
    assert out.token_ids == base.token_ids[: len(out.token_ids)]


def test_min_tokens_masks_eos(tiny_llama):
    with LLM(f"model.path={tiny_llama}", "cache=sdpa") as llm:
        p = prompts_for(llm.engine.vocab_size)[1]
        base = llm.generate([p], greedy(16))[0].token_ids
        eos = base[2]  # pretend the third greedy token is EOS
        llm.engine.outputs.eos_token_ids = (eos,)
        plain = llm.generate([p], SamplingParams(temperature=0, max_tokens=16))[0]
        held = llm.generate([p], SamplingParams(temperature=0, max_tokens=16, min_tokens=5))[0]
    assert plain.token_ids == base[:3] and plain.finish_reason == "stop"
    assert len(held.token_ids) >= 5 and eos not in held.token_ids[:5]


def test_logprobs_match_transformers(llama_llm, tiny_llama):
    from transformers import AutoModelForCausalLM

    p = prompts_for(llama_llm.engine.vocab_size)[2]
    out = llama_llm.generate([p], greedy(4, logprobs=3))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for tok, lp in zip(out.token_ids, lps):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.top[0][0] == tok and lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([p])).logits[0, -1].float(), -1)
    assert lps[0].logprob == pytest.approx(ref[out.token_ids[0]].item(), abs=1e-4)


def test_bad_requests_are_refused_clearly(llama_llm):
    e = llama_llm.engine
    with pytest.raises(RequestError, match="context"):
        llama_llm.generate([[5] * (e.max_model_len + 1)], greedy(4))
    with pytest.raises(RequestError, match="max_tokens"):
        llama_llm.generate([[5] * 10], greedy(e.max_model_len))
    for bad in ([e.vocab_size + 3], [5, -1], [5, 2**70]):
        with pytest.raises(RequestError, match=f"token id {bad[-1]!r} is outside the vocabulary"):
            llama_llm.generate([bad], greedy(4))
    for bad in ([5, True], [5, 2.0], [5, "7"]):
        with pytest.raises(RequestError, match=f"token ids must be integers, got {bad[-1]!r}"):
            llama_llm.generate([bad], greedy(4))
    with pytest.raises(RequestError, match="empty"):
        llama_llm.generate([""], greedy(4))
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=-1)
    # nothing was left behind: the engine still serves
    assert len(llama_llm.generate([[5, 6, 7]], greedy(3))[0].token_ids) == 3
    assert llama_llm.engine.scheduler.kv.usage() == 0.0


def test_string_prompts_and_text(llama_llm):
    tok = llama_llm.tokenizer
    out = llama_llm.generate("Hello there", greedy(10))[0]
    assert out.prompt_token_ids == tok.encode("Hello there")
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)


def test_pinned_staging_ring():
    """The staging ring (nanoslg/tensors.py) with plain memory and recorded waits standing in for
    pinned memory and CUDA events: views hold their data, stay aligned, and a buffer is reused only
    after waiting for the step that last filled it."""
    import numpy as np

    from nanoslg.core.tensors import PinnedStaging

    class Ring(PinnedStaging):
        def _alloc(self, nbytes):
            return torch.zeros(nbytes, dtype=torch.uint8)

        def _record(self, slot):
            self.events[slot] = ("recorded", slot)
            log.append(("record", slot))

        def _wait(self, slot):
            log.append(("wait", slot))

    log = []
    ring = Ring(slot_bytes=64)
    a = ring.host(np.arange(3, dtype=np.int64))
    b = ring.host(np.array([7, 8, 9], dtype=np.int32))
    c = ring.empty((2,), torch.float32)
    assert a.tolist() == [0, 1, 2] and b.tolist() == [7, 8, 9] and c.shape == (2,)
    offsets = [t.data_ptr() - ring.bufs[0].data_ptr() for t in (a, b, c)]
    assert offsets == [0, 24, 40]  # each view starts 8-byte aligned
    ring.host(np.zeros(4, dtype=np.int64))  # 32 more bytes do not fit: the next buffer
    assert ring.slot == 1 and log == [("record", 0)]
    assert a.tolist() == [0, 1, 2]  # the filled buffer is left alone
    big = ring.host(np.arange(40, dtype=np.int64))  # larger than a buffer: slots grow
    assert big.tolist() == list(range(40)) and ring.slot_bytes >= 320
    for _ in range(ring.SLOTS):
        ring.next_step()
    assert ("wait", 0) in log and log.index(("wait", 0)) > log.index(("record", 0))


def test_shutdown_unfreezes_what_the_engine_froze(tiny_llama):
    """While it runs, the engine freezes what start-up built out of garbage collection; after shutdown
    nothing of it may stay frozen, or a reference cycle through the KV backend outlives the engine
    (on a GPU: the whole KV pool's memory, which the next engine then cannot have)."""
    import gc
    import weakref

    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # as in a fresh process, so this engine is the one that freezes
    try:
        llm = LLM(f"model.path={tiny_llama}", "cache=paged")
        backend = llm.engine.executor.backend
        backend.cycle = backend  # a reference cycle through the backend, as graph buffers can make
        alive = weakref.ref(backend)
        assert gc.get_freeze_count() > 0
        del backend
        llm.shutdown()
        del llm
        gc.collect()
        assert alive() is None and gc.get_freeze_count() == 0 and gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*saved)
