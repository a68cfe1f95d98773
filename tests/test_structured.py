"""Structured outputs and logit_bias in the engine, on the demo model: its weights are random, so
whatever parses is the grammar's doing.

The property test runs a few hundred generated JSON schemas (and regexes and choices), greedy and
sampled, under overlap scheduling, without it, and with the paged cache; every completion that
ends with "stop" must validate, and one cut by max_tokens ends with "length" at exactly max_tokens.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import structured_cases as sc
from conftest import greedy
from structured_cases import MAX, params_for, run_property

from nanoslg import LLM, SamplingParams
from nanoslg.core.errors import RequestError
from nanoslg.core.sampling_params import StructuredOutputs as S


@pytest.fixture(scope="module")
def demo_llm(demo_model):
    llm = LLM(f"model.path={demo_model}", "cache=sdpa")
    yield llm
    llm.shutdown()


@pytest.mark.parametrize(
    "overrides,seed,shards",
    [
        ([], 1, 3),
        (["scheduler.overlap=false"], 2, 1),
        (["cache=paged", "cache.page_size=8"], 3, 2),
        (["cache=paged", "cache.page_size=8", "speculative=ngram"], 5, 2),
    ],
    ids=["overlap-3-shards", "no-overlap", "paged-2-shards", "speculative-ngram"],
)
def test_every_stopped_completion_validates(demo_model, overrides, seed, shards, monkeypatch):
    """`shards`: mask threads, each with its own compile of every grammar (structured.SHARDS), so the
    sharded fill runs here too, whatever the CPU count."""
    import nanoslg.engine.structured as structured

    monkeypatch.setattr(structured, "SHARDS", shards)
    with LLM(f"model.path={demo_model}", "cache=sdpa", *overrides) as llm:
        counts = run_property(llm, seed, n_schemas=110)
        assert llm.engine.overlap == (not {"scheduler.overlap=false", "speculative=ngram"} & set(overrides))
        if "speculative=ngram" in overrides:  # constrained rows verified proposals, and kept some
            m = llm.engine.metrics
            assert m.spec_num_drafts > 0 and m.spec_num_accepted_tokens > 0, (
                m.spec_num_drafts,
                m.spec_num_accepted_tokens,
            )
    total = sum(counts.values())
    assert counts.get("stop", 0) >= total * 0.6, counts  # the grammars do end: most finish
    assert set(counts) <= {"stop", "length"}, counts


def test_preemption_and_chunked_prefill_keep_grammars_whole(demo_model):
    """Little KV (preemption) and a small token budget (prompts in chunks), long prompts: a preempted
    sequence recomputes its outputs and keeps its matcher."""
    with LLM(
        f"model.path={demo_model}",
        "cache=paged",
        "cache.page_size=8",
        "cache.max_num_tokens=160",
        "scheduler.max_num_batched_tokens=32",
    ) as llm:
        counts = run_property(llm, 4, n_schemas=12, prompts=("a long prompt " * 8, "Hello " * 12))
        assert llm.engine.metrics.preemptions > 0, "the KV budget was meant to force preemption"
    assert counts.get("stop", 0) > 0, counts


def test_max_tokens_n_min_tokens_and_stop_strings(demo_llm):
    items = {"type": "array", "items": {"type": "integer"}, "minItems": 5}
    schema = {"type": "object", "properties": {"items": items}, "required": ["items"]}
    cut = demo_llm.generate("x", SamplingParams(temperature=0, max_tokens=3, structured_outputs=S(json=schema)))[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3 and cut.text.startswith("{")

    out = demo_llm.generate(
        "x", SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=MAX, structured_outputs=S(regex=r"[a-z]{1,6}"))
    )[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({o.text for o in out.outputs}) > 1  # each sample its own matcher and draws
    for o in out.outputs:
        assert o.finish_reason == "stop"
        sc.check_regex(o.text, r"[a-z]{1,6}")

    # min_tokens masks EOS while the grammar could go on: `[0-9]+` only ends by EOS
    held = demo_llm.generate("x", params_for(S(regex="[0-9]+"), 0, min_tokens=6, max_tokens=12))[0]
    assert len(held.token_ids) >= 6 and held.text.isdigit()

    # a stop string cuts a constrained output like any other
    stopped = demo_llm.generate(
        "x", SamplingParams(temperature=0, structured_outputs=S(choice=["alpha beta"]), stop=[" "])
    )
    assert stopped[0].finish_reason == "stop" and stopped[0].text == "alpha"


def test_gbnf_grammar_and_json_object(demo_llm):
    gbnf = 'root ::= "(" num ("," num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'
    outs = demo_llm.generate(["a", "b", "c"], [params_for(S(grammar=gbnf), i) for i in range(3)])
    for o in outs:
        if o.finish_reason == "stop":
            sc.check_regex(o.text, r"\((\d|[1-9]\d)(,(\d|[1-9]\d))*\)")
    assert any(o.finish_reason == "stop" for o in outs)
    obj = demo_llm.generate("d", SamplingParams(temperature=0, max_tokens=200, structured_outputs=S(json_object=True)))
    if obj[0].finish_reason == "stop":
        assert isinstance(json.loads(obj[0].text), dict)
    assert obj[0].text.startswith("{")


def test_logit_bias_moves_the_greedy_token(demo_llm):
    base = demo_llm.generate("Hello", greedy(1))[0].token_ids[0]
    banned = demo_llm.generate("Hello", greedy(1, logit_bias={base: -100}))[0].token_ids[0]
    assert banned != base
    forced = demo_llm.generate("Hello", greedy(4, logit_bias={77: 100}))[0].token_ids
    assert forced == [77] * 4
    # a biased sequence beside a free one: the free one's greedy tokens do not change
    both = demo_llm.generate(["Hello", "Hello"], [greedy(4), greedy(4, logit_bias={77: 100})])
    assert both[0].token_ids == demo_llm.generate("Hello", greedy(4))[0].token_ids and both[1].token_ids == [77] * 4


def test_bad_specs_are_refused_naming_the_field(demo_llm):
    cases = [
        (S(json={"type": 5}), "structured_outputs.json"),  # not a valid schema
        (S(json={"type": "array", "uniqueItems": True}), "structured_outputs.json"),  # unsupported keyword
        (S(regex="(("), "structured_outputs.regex"),
        (S(grammar="root ::= foo"), "structured_outputs.grammar"),  # an undefined rule
        (S(grammar='root ::= "a" )'), "structured_outputs.grammar"),  # a syntax error
    ]
    for spec, param in cases:
        with pytest.raises(RequestError) as e:
            demo_llm.generate("x", SamplingParams(structured_outputs=spec))
        assert e.value.param == param, (spec, e.value)
    for kw, param in [
        (dict(json="{not json"), "structured_outputs.json"),
        (dict(regex="a", choice=["b"]), "structured_outputs"),
        (dict(choice=[]), "structured_outputs.choice"),
    ]:
        with pytest.raises(RequestError) as e:
            S(**kw)
        assert e.value.param == param
    for bias in ({5: 100.5}, {-1: 1}, {"7": 1}):
        with pytest.raises(RequestError) as e:
            SamplingParams(logit_bias=bias)
        assert e.value.param == "logit_bias"
    with pytest.raises(RequestError, match="outside the vocabulary") as e:
        demo_llm.generate("x", SamplingParams(logit_bias={demo_llm.engine.vocab_size: 1}))
    assert e.value.param == "logit_bias"


def test_a_tokenizer_llguidance_cannot_read_is_not_blamed_on_the_spec(demo_tokenizer, monkeypatch):
    """llguidance before 1.7 takes one EOS id, and Qwen3's or Llama-3's tokenizer ends on several: its
    TypeError was reported as "the json does not compile". It names llguidance and the tokenizer now."""
    import llguidance.hf

    from nanoslg.engine.structured import Grammars

    def refuse(*args, **kwargs):
        raise TypeError("argument 'eos_token': 'list' object cannot be interpreted as an integer")

    monkeypatch.setattr(llguidance.hf, "from_tokenizer", refuse)
    g = Grammars(demo_tokenizer, len(demo_tokenizer), (1, 2))
    try:
        with pytest.raises(RequestError, match="could not read this model's tokenizer") as e:
            asyncio.run(g.compile(S(json={"type": "object"})))
        assert "does not compile" not in str(e.value) and "eos_token" in str(e.value)
    finally:
        g.shutdown()


def test_a_grammar_compiled_after_add_request(demo_llm):
    """engine.add_request with a spec not compiled yet: the request starts once it is; a bad spec
    ends the stream with its error; an abort while compiling ends the stream."""
    from nanoslg.engine.stream import collect

    engine = demo_llm.engine

    async def run():
        ok = engine.add_request("x", SamplingParams(temperature=0, structured_outputs=S(regex=r"[0-9]{3}z")))
        bad = engine.add_request("x", SamplingParams(structured_outputs=S(regex="[unclosed")))
        gone = engine.add_request("x", SamplingParams(n=2, structured_outputs=S(regex=r"[a-c]{2}q")))
        engine.abort(gone.request_id)
        out = await collect(ok)
        with pytest.raises(RequestError) as e:
            await collect(bad)
        aborted = await collect(gone)
        return out, e.value, aborted

    out, err, aborted = demo_llm._call(run())
    assert out.finish_reason == "stop" and len(out.text) == 4 and out.text.endswith("z")
    assert err.param == "structured_outputs.regex"
    assert [o.finish_reason for o in aborted.outputs] == ["abort", "abort"]
    assert not engine.grammars.waiting and engine.outputs.num_constrained == 0


def test_overlap_defers_constrained_sampling_only(demo_tokenizer):
    """The engine loop over a model-less executor with overlap: a plan whose constrained rows wait for
    the token in flight is launched with sample_later and gets its masks afterwards; plans of free
    sequences carry no masks. The executor draws the lowest allowed token, so the outputs parse."""
    from nanoslg.cache.paged import PagedKVManager
    from nanoslg.core.config import SchedulerConfig
    from nanoslg.engine.async_engine import AsyncEngine
    from nanoslg.engine.stream import collect
    from nanoslg.parallel.instant import InstantExecutor
    from nanoslg.scheduler.policy import FCFSPolicy
    from nanoslg.scheduler.scheduler import Scheduler

    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)
    executor = InstantExecutor(overlap=True, token=9, record=True)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }

    async def run():
        engine = AsyncEngine(
            Scheduler(cfg, PagedKVManager(64, 8, prefix_caching=True), FCFSPolicy(cfg)),
            executor,
            demo_tokenizer,
            model_name="none",
            max_model_len=256,
            vocab_size=len(demo_tokenizer),
            eos_token_ids=(2,),
        )
        await engine.start()
        free = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        await collect(free)
        n_free = len(executor.plans)
        params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=S(json=schema))
        await engine.compile_structured(params)
        streams = [engine.add_request([5, 6, 7 + i], params) for i in range(3)]
        outs = await asyncio.gather(*(collect(s) for s in streams))
        await engine.shutdown()
        return n_free, outs

    n_free, outs = asyncio.run(run())
    assert all(p.masks is None and not p.sample_later for p in executor.plans[:n_free])
    assert any(p.sample_later for p in executor.plans[n_free:])
    for o in outs:
        assert o.finish_reason == "stop", o.text
        sc.check_json(o.text, schema)


def test_offline_json_bench_generates_what_offline_does(tiny_llama, tmp_path):
    """W11's workload: every other request constrained, by a schema that outlasts max_tokens, so every
    request runs to its max_tokens as in the offline workload; its grammar compiles in the warm-up."""
    from nanoslg.bench.runner import run_bench
    from nanoslg.bench.structured import OfflineJson
    from nanoslg.bench.workloads import TokenSpace, make_requests, warmup_requests
    from nanoslg.core.compose import compose_config

    tiny = ["bench.num_requests=6", "bench.input_len_min=8", "bench.input_len_max=16", "bench.output_len_min=20"]
    tiny += ["bench.output_len_max=40", "bench.warmup=1", "bench.extra.progress=false", "bench.extra.aggregate=false"]
    cfg, node = compose_config(
        [f"model.path={tiny_llama}", "cache=sdpa", "mode=bench", "bench=offline_json", f"bench.output_dir={tmp_path}"]
        + tiny
    )
    reqs = OfflineJson().requests(cfg.bench, TokenSpace(100))
    assert [r.structured is not None for r in reqs] == [True, False] * 3
    assert warmup_requests(cfg.bench, reqs)[0].structured is not None
    res = run_bench(cfg, node)
    assert res["completed"] == 6 and res["failed"] == 0
    assert res["output_tokens"] == sum(r.max_tokens for r in make_requests(cfg.bench, TokenSpace(100)))


def test_the_engines_token_slices_give_llguidances_default_masks(demo_model):
    """engine/structured.py's SLICES (string bodies narrow to wide) only change how a mask is computed:
    along random walks through W11's schema, the property test's schemas and the regexes, every mask
    equals the one llguidance's default slices give."""
    import llguidance as llg
    import numpy as np
    from llguidance.hf import from_tokenizer

    from nanoslg.bench.structured import SCHEMA
    from nanoslg.engine.structured import JSON_DEFAULTS, SLICES

    with LLM(f"model.path={demo_model}", "cache=sdpa") as llm:
        tok = llm.engine.grammars.tokenizer
    n = len(tok)
    words = (n + 31) // 32
    tokenizers = [from_tokenizer(tok, n_vocab=n, slices=s) for s in (None, SLICES)]
    grammars = [llg.LLMatcher.grammar_from_json_schema(s, defaults=JSON_DEFAULTS) for s in [SCHEMA, *sc.schemas(15, 5)]]
    grammars += [llg.LLMatcher.grammar_from_regex(r) for r in sc.REGEXES]
    rng, states = np.random.default_rng(0), 0
    for g in grammars:
        pair = [llg.LLMatcher(t, g, log_level=0) for t in tokenizers]
        for _ in range(40):
            if pair[0].is_stopped():
                break
            bits = np.zeros((2, words), dtype=np.int32)
            for j, m in enumerate(pair):
                m.unsafe_compute_mask_ptr(bits[j].ctypes.data, words * 4)
            assert (bits[0] == bits[1]).all(), g[:80]
            allowed = np.unpackbits(bits[0].view(np.uint8), bitorder="little")[:n].astype(bool)
            logits = rng.standard_normal(n)
            logits[~allowed] = -np.inf
            t = int(np.argmax(logits))
            assert all(m.consume_token(t) for m in pair)
            states += 1
    assert states > 300, states
