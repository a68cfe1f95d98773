"""Speculative decoding: greedy output equals transformers (and speculative=none) whatever proposes and
however the scheduler batches; sampling keeps the target's distribution; KV of rejected proposals is
rolled back; the counters reach /metrics and the builder turns the feature off where it cannot run.

Proposers: `ngram` (prompt lookup, as configured), `oracle` (ngram's slot filled with the reference
continuation, one proposal in three corrupted: long accepted runs and rejections at every place),
`self` (the target as its own draft: everything accepted), `noisy` (the target's weights plus noise:
partly accepted) and `other` (a second random checkpoint: nearly everything rejected).
"""

import os
import random
import shutil

import pytest
import torch
from conftest import NEW, TINY, greedy, make_checkpoint, prompts_for

from nanoslg import LLM, SamplingParams
from nanoslg.model import spec_sampling
from nanoslg.model.spec_sampling import rejection_sample
from nanoslg.scheduler import speculative
from nanoslg.scheduler.speculative import ngram_propose

K = 3  # proposals per step in these tests


@pytest.fixture(scope="module")
def drafts(tiny_llama, ckpt_root, tokenizer_dir):
    """Draft checkpoints for tiny_llama: `noisy` (its weights plus noise), `other` (unrelated, 2 layers)."""
    import safetensors.torch as st

    noisy = os.path.join(ckpt_root, "tiny_llama_noisy")
    if not os.path.exists(noisy):
        shutil.copytree(tiny_llama, noisy)
        weights = st.load_file(os.path.join(noisy, "model.safetensors"))
        gen = torch.Generator().manual_seed(0)
        for name, w in weights.items():
            if "mlp" in name:
                weights[name] = w + 0.25 * w.std() * torch.randn(w.shape, generator=gen)
        st.save_file(weights, os.path.join(noisy, "model.safetensors"), metadata={"format": "pt"})
    other = make_checkpoint(ckpt_root, "tiny_llama_other", tokenizer_dir, tie_word_embeddings=True, num_hidden_layers=2)
    return {"self": "target", "noisy": noisy, "other": other}


@pytest.fixture
def oracle(monkeypatch):
    """oracle(references): ngram proposals become the reference continuations (prompt -> new tokens),
    each proposal wrong with probability 1/3."""

    def install(refs: dict[tuple, list[int]]):
        rng = random.Random(0)

        def propose(tokens, k, min_n, max_n):
            for prompt, out in refs.items():
                if tuple(tokens[: len(prompt)]) == prompt:
                    props = list(out[len(tokens) - len(prompt) :][:k])
                    return [t if rng.random() > 1 / 3 else (t + 1) % 500 + 3 for t in props]
            return []

        monkeypatch.setattr(speculative, "ngram_propose", propose)

    return install


def spec_args(method: str, drafts) -> list[str]:
    if method in ("ngram", "oracle"):
        return ["speculative=ngram", f"speculative.num_tokens={K}"]
    return ["speculative=draft", f"speculative.num_tokens={K}", f"speculative.draft.path={drafts[method]}"]


CONFIGS = {
    "plain": ["cache=sdpa"],
    "chunked": ["cache=sdpa", "scheduler.max_num_batched_tokens=7"],
    "preempt": ["cache=paged", "cache.max_num_tokens=96", "cache.page_size=8"],
    "max-seqs": ["cache=paged", "scheduler.max_num_seqs=2"],
    "prefix": ["cache=paged", "cache.page_size=4"],
}
CASES = [
    *[("oracle", c) for c in ("plain", "chunked", "preempt", "prefix")],
    *[("noisy", c) for c in ("chunked", "preempt", "max-seqs")],
    ("self", "plain"),
    ("self", "prefix"),
    *[("ngram", c) for c in ("plain", "chunked", "prefix")],
    ("other", "chunked"),
]


PROMPTS = prompts_for(500)
# Later prompts share the longest one's pages: with cache=paged they are admitted from the prefix cache.
PREFIXED = PROMPTS + [PROMPTS[3][:30] + p[:5] for p in PROMPTS[:3]]


@pytest.fixture(scope="module")
def references(tiny_llama, hf_greedy):
    return {tuple(p): hf_greedy(tiny_llama, p, NEW) for p in PREFIXED}


@pytest.mark.parametrize("method,config", CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_greedy_equals_transformers(method, config, tiny_llama, drafts, oracle, references):
    prompts = PREFIXED if config == "prefix" else PROMPTS
    refs = {tuple(p): references[tuple(p)] for p in prompts}
    if method == "oracle":
        oracle({p: list(out) for p, out in refs.items()})
    with LLM(f"model.path={tiny_llama}", *CONFIGS[config], *spec_args(method, drafts)) as llm:
        if config == "prefix":
            first = llm.generate(prompts[:4], greedy())
            outs = first + llm.generate(prompts[4:], greedy())
        else:
            outs = llm.generate(prompts, greedy())
        m, sched = llm.engine.metrics, llm.engine.scheduler
        assert not llm.engine.overlap
        if sched.kv.paged:  # every page back once the cache lets go: rejected proposals' pages were freed
            sched.kv.check()
            sched.kv.flush()
            assert sched.kv.num_free_pages() == sched.kv.num_pages
    for p, out in zip(prompts, outs):
        assert out.token_ids == refs[tuple(p)], f"{method}/{config}: prompt of {len(p)} tokens differs"
        assert out.finish_reason == "length"
    assert m.spec_num_drafts > 0 and m.spec_num_draft_tokens >= m.spec_num_accepted_tokens
    if method == "self":
        assert m.spec_num_accepted_tokens == m.spec_num_draft_tokens
    if method in ("oracle", "noisy"):  # both kept and rejected proposals
        assert 0 < m.spec_num_accepted_tokens < m.spec_num_draft_tokens
    if config == "preempt":
        assert m.preemptions > 0
    if config == "prefix":
        assert m.prefix_cache_hits > 0


def test_stops_inside_an_accepted_run(tiny_llama, demo_tokenizer):
    """max_tokens, stop ids and stop strings cut a run of accepted tokens where speculative=none stops."""
    prompts = prompts_for(500)
    with LLM(f"model.path={tiny_llama}", "cache=sdpa", "scheduler.overlap=false") as llm:
        base = llm.generate(prompts, greedy())
    text = demo_tokenizer.decode(base[2].token_ids[6:9])
    params = [
        greedy(7),
        greedy(stop_token_ids=[base[1].token_ids[5]]),
        SamplingParams(temperature=0.0, max_tokens=NEW, stop=[text.strip()[:3] or text]),
        greedy(9),
    ]
    runs = []
    for extra in ([], ["speculative=draft", "speculative.draft.path=target", "speculative.num_tokens=4"]):
        with LLM(f"model.path={tiny_llama}", "cache=sdpa", "scheduler.overlap=false", *extra) as llm:
            runs.append([(o.token_ids, o.text, o.finish_reason) for o in llm.generate(prompts, params)])
            spec = llm.engine.metrics.spec_num_accepted_tokens
    assert runs[0] == runs[1]
    assert spec > 0
    assert [len(r[0]) for r in runs[1]][0] == 7 and runs[1][1][2] == "stop" and runs[1][2][2] == "stop"


def logprob_rows(out) -> list:
    return [(lp.token_id, round(lp.logprob, 3), [t for t, _ in lp.top]) for lp in out.outputs[0].logprobs or []]


def test_logprobs_and_requests_that_do_not_speculate(tiny_llama, drafts, hf_greedy):
    """Logprobs come from the verify rows and equal plain decoding's; penalties and logit_bias ride in
    the same steps without proposals and give what speculative=none gives; seeded speculation is
    reproducible."""
    prompts = prompts_for(500)
    params = [
        greedy(logprobs=2),
        SamplingParams(temperature=0.8, seed=3, max_tokens=16, ignore_eos=True, repetition_penalty=1.2),
        SamplingParams(temperature=0.0, max_tokens=16, logit_bias={300: 5.0}),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=5, max_tokens=16, ignore_eos=True, logprobs=0),
    ]
    runs = []
    for extra in ([], spec_args("noisy", drafts), spec_args("noisy", drafts)):
        with LLM(f"model.path={tiny_llama}", "cache=sdpa", "scheduler.overlap=false", *extra) as llm:
            outs = llm.generate(prompts, params)
            accepted = llm.engine.metrics.spec_num_accepted_tokens
        runs.append(([o.token_ids for o in outs], [logprob_rows(o) for o in outs]))
    none, spec, again = runs
    assert accepted > 0
    assert spec[0][0] == hf_greedy(tiny_llama, prompts[0], NEW)
    assert spec[0][:3] == none[0][:3]  # greedy, and the rows that did not speculate
    assert spec[1][:3] == none[1][:3]  # logprobs of every token, accepted proposals too
    assert len(spec[1][3]) == 16 and all(top == [] for _, _, top in spec[1][3])
    assert spec == again  # seeded: the same draws


def test_structured_outputs_speculate(tiny_llama, monkeypatch):
    """Constrained requests verify proposals under their grammar masks and give what speculative=none
    gives: proposals are the reference continuation, one in three wrong (often a token the grammar
    refuses), and go on past the grammar's end, so a step can end the grammar halfway."""
    from nanoslg.core.sampling_params import StructuredOutputs as S

    prompts = prompts_for(500)[:4]
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"enum": ["x", "y"]}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    specs = [S(regex="[a-d]{3,8}"), S(json=schema), S(choice=["ab", "abcd", "bad"]), S(regex="(ab){1,3}c")]
    params = [SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=s) for s in specs]
    params.append(SamplingParams(temperature=0.0, max_tokens=24, logit_bias={300: 100.0}))  # forced: 300, 300, ...
    prompts.append(prompts[0])
    base = ["cache=sdpa", "scheduler.overlap=false"]
    with LLM(f"model.path={tiny_llama}", *base) as llm:
        ref = [(o.token_ids, o.text, o.finish_reason) for o in llm.generate(prompts, params)]
    assert ref[4][0] == [300] * 24
    rng = random.Random(1)
    refs = {tuple(p): r[0] for p, r in zip(prompts[:4], ref)}

    def propose(tokens, k, min_n, max_n):
        for prompt, out in refs.items():
            if tuple(tokens[: len(prompt)]) == prompt:
                props = (out[len(tokens) - len(prompt) :] + [7, 8, 9, 10])[:k]  # on past the end
                return [t if rng.random() > 1 / 3 else rng.randrange(3, 500) for t in props]
        return [300] * k  # the biased request: its own forced token

    monkeypatch.setattr(speculative, "ngram_propose", propose)
    for extra in (
        ["speculative=ngram", "speculative.num_tokens=3"],
        ["speculative=draft", "speculative.draft.path=target"],
    ):
        for cache in (base, ["cache=paged", "cache.page_size=8"]):
            with LLM(f"model.path={tiny_llama}", *cache, *extra) as llm:
                got = [(o.token_ids, o.text, o.finish_reason) for o in llm.generate(prompts, params)]
                m = llm.engine.metrics
            assert got == ref, (extra, cache)
            assert m.spec_num_drafts > 0
            # The draft proposes without the grammar or the bias, so only the reference proposals stay.
            assert m.spec_num_accepted_tokens > 0 or extra[0] == "speculative=draft"
    assert all(r[2] == "stop" for r in ref[:4]), ref
    assert set(ref[0][1]) <= set("abcd") and ref[3][1].endswith("c")


def test_sampled_structured_outputs_with_speculation_stay_valid(tiny_llama):
    import re

    from nanoslg.core.sampling_params import StructuredOutputs as S

    params = SamplingParams(n=8, temperature=1.0, seed=4, max_tokens=30, structured_outputs=S(regex="(ab|cd)+e"))
    with LLM(f"model.path={tiny_llama}", "cache=sdpa", "speculative=ngram") as llm:
        out = llm.generate(prompts_for(500)[:1], params)[0]
        assert llm.engine.metrics.spec_num_accepted_tokens > 0
    for c in out.outputs:
        assert c.finish_reason == "length" or re.fullmatch("(ab|cd)+e", c.text), c


def test_ngram_propose():
    assert ngram_propose([1, 2, 3, 4, 9, 1, 2, 3], 3, 1, 3) == [4, 9, 1]
    assert ngram_propose([1, 2, 3, 4, 9, 1, 2, 3], 1, 1, 3) == [4]
    # The latest match wins; a longer n-gram is tried first.
    assert ngram_propose([5, 7, 6, 5, 8, 6, 5], 2, 1, 2) == [8, 6]
    assert ngram_propose([5, 7, 6, 5, 8, 6, 5], 2, 1, 1) == [8, 6]
    assert ngram_propose([1, 2, 3], 4, 1, 3) == []
    assert ngram_propose([1, 2, 1], 4, 2, 3) == []  # only 1-grams match, below min_n
    # A match near the end: the text repeats with that period, and so do the proposals.
    assert ngram_propose([4, 4], 5, 1, 2) == [4, 4, 4, 4, 4]
    assert ngram_propose([7, 1, 2, 1, 2], 4, 1, 2) == [1, 2, 1, 2]
    assert ngram_propose([3, 1, 2, 9, 1, 2], 4, 2, 2) == [9, 1, 2, 9]


# -- sampling keeps the target's distribution ------------------------------------------------------
V, M, DRAWS = 6, 2, 200_000
CHI2_BOUND = 20.52  # chi-square with V - 1 = 5 degrees of freedom at p = 0.001


def accept_all(p, q, draft, u, noise):
    """Broken on purpose: every proposal kept."""
    kept, _ = rejection_sample(p, q, draft, torch.zeros_like(u), noise)
    return kept, (p[:, -1] / noise).argmax(dim=-1)


def resample_from_p(p, q, draft, u, noise):
    """Broken on purpose: a rejection draws from p, not from max(0, p - q)."""
    kept, tok = rejection_sample(p, q, draft, u, noise)
    rows = torch.arange(p.shape[0])
    return kept, (p[rows, kept] / noise).argmax(dim=-1)


RULES = {"exact": rejection_sample, "accept-all": accept_all, "resample-from-p": resample_from_p}


def emitted_chi2(rule, point_mass: bool) -> float:
    """Largest chi-square statistic, over the first M + 1 emitted positions, of the tokens the rule emits
    against the target's distribution at that position (the target's rows do not depend on the prefix,
    so each position's marginal must be exactly its row)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(2 * torch.randn(M + 1, V, generator=gen), dim=-1)
    q = torch.softmax(2 * torch.randn(M, V, generator=gen), dim=-1)
    draft = torch.multinomial(q, DRAWS, replacement=True, generator=gen).T  # [DRAWS, M]
    if point_mass:  # an n-gram proposal: always the same token
        draft = torch.full((DRAWS, M), 1)
        q = torch.nn.functional.one_hot(torch.tensor([1] * M), V).float()
    u = torch.rand(DRAWS, M, generator=gen)
    noise = torch.empty(DRAWS, V).exponential_(generator=gen)
    kept, tok = rule(p[None].expand(DRAWS, -1, -1), q[None].expand(DRAWS, -1, -1), draft, u, noise)
    # The emitted sequence: the kept proposals, then the drawn token; later positions need more rounds,
    # so each position is judged over the draws that reached it in this round.
    worst = 0.0
    for pos in range(M + 1):
        reached = kept >= pos
        toks = torch.where(kept[reached] > pos, draft[reached, min(pos, M - 1)], tok[reached])
        expected = p[pos] * reached.sum()
        worst = max(worst, ((torch.bincount(toks, minlength=V) - expected) ** 2 / expected).sum().item())
    return worst


@pytest.mark.parametrize("point_mass", [False, True], ids=["draft-q", "ngram-point-mass"])
@pytest.mark.parametrize("rule", list(RULES))
def test_rejection_rule_keeps_the_target_distribution(rule, point_mass):
    chi2 = emitted_chi2(RULES[rule], point_mass)
    if rule == "exact":
        assert chi2 < CHI2_BOUND, f"the exact rule strays from the target (chi-square {chi2:.1f})"
    else:  # the same statistic rejects a rule broken on purpose
        assert chi2 > 10 * CHI2_BOUND, f"{rule}: the statistic ({chi2:.1f}) does not catch it"


@pytest.fixture(scope="module")
def vocab16(ckpt_root):
    """Target and draft over a vocabulary of 16 tokens, no tokenizer; soft logits (many likely tokens)."""
    import transformers

    paths = []
    for name, seed in (("v16_target", 1), ("v16_draft", 2)):
        path = os.path.join(ckpt_root, name)
        if not os.path.exists(path):
            torch.manual_seed(seed)
            cfg = transformers.LlamaConfig(**{**TINY, "vocab_size": 16, "num_hidden_layers": 2}, eos_token_id=1)
            transformers.LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
        paths.append(path)
    return paths


def tokens_at(path: str, extra: list[str], n: int) -> torch.Tensor:
    """[n, 4] tokens of n seeded draws of 4 tokens from one prompt."""
    prompt = [3, 9, 4, 12, 7]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=4, ignore_eos=True) for i in range(n)]
    with LLM(f"model.path={path}", "cache=sdpa", "scheduler.overlap=false", *extra) as llm:
        outs = llm.generate([prompt] * n, params)
    return torch.tensor([o.token_ids for o in outs])


CHI2_15 = 37.70  # chi-square with 15 degrees of freedom (16 tokens) at p = 0.001


@pytest.fixture(scope="module")
def plain_draws(vocab16):
    return tokens_at(vocab16[0], [], 2000)


@pytest.mark.parametrize("rule", ["exact", "accept-all", "resample-from-p"])
def test_engine_sampling_keeps_the_target_distribution(rule, vocab16, plain_draws, monkeypatch):
    """End to end: the tokens that verify steps emit (positions 2..4) are distributed as without
    speculation: a two-sample chi-square per position, which rejects the rule broken on purpose."""
    target, draft = vocab16
    monkeypatch.setattr(spec_sampling, "rejection_sample", RULES[rule])
    args = ["speculative=draft", "speculative.num_tokens=3", f"speculative.draft.path={draft}"]
    spec = tokens_at(target, args, len(plain_draws))
    chi2 = 0.0
    for pos in range(1, 4):
        a = torch.bincount(spec[:, pos], minlength=16).float()
        b = torch.bincount(plain_draws[:, pos], minlength=16).float()
        seen = (a + b) > 0
        chi2 = max(chi2, ((a - b)[seen] ** 2 / (a + b)[seen]).sum().item())
    if rule == "exact":
        assert chi2 < CHI2_15, f"speculative sampling strays from plain sampling (chi-square {chi2:.1f})"
    else:
        assert chi2 > CHI2_15, f"{rule}: the statistic ({chi2:.1f}) does not catch it"


# -- metrics and start-up ----------------------------------------------------------------------------
def test_metrics_reach_prometheus(tiny_llama):
    from nanoslg.server.metrics import ServerMetrics

    with LLM(f"model.path={tiny_llama}", "speculative=draft", "speculative.draft.path=target") as llm:
        llm.generate(prompts_for(500)[:2], greedy(12))
        text = ServerMetrics(llm.engine, "tiny").render()[0].decode()
        drafts = llm.engine.metrics.spec_num_drafts
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if "spec_decode" in line and not line.startswith("#")
    }
    assert values["vllm:spec_decode_num_drafts_total"] == drafts > 0
    assert values["vllm:spec_decode_num_draft_tokens_total"] == values["vllm:spec_decode_num_accepted_tokens_total"]
    assert values["nanoslg:spec_decode_mean_accepted_length"] > 4  # everything accepted: k + 1 but the last rows


def test_bench_record_and_report(tiny_llama, tmp_path, capsys):
    """A batch-1 bench run records and reports proposed, accepted and the mean accepted length (21
    tokens: the prefill's, then four verify rows of 4 accepted proposals and the target's own)."""
    import json

    from nanoslg.bench.runner import run_bench
    from nanoslg.core.compose import compose_config

    args = [f"model.path={tiny_llama}", "mode=bench", "bench=batch1", f"bench.output_dir={tmp_path}"]
    args += ["bench.input_len_min=8", "bench.input_len_max=8", "bench.output_len_min=21", "bench.output_len_max=21"]
    args += ["bench.extra.progress=false", "speculative=draft", "speculative.draft.path=target"]
    res = run_bench(*compose_config(args))
    spec = json.loads(open(res["record"]).read())["results"]["engine"]["speculative"]
    assert spec["method"] == "draft" and spec["num_tokens"] == 4
    assert spec["proposed"] == spec["accepted"] > 0 and spec["mean_accepted_length"] == 5.0
    out = capsys.readouterr().out
    assert "mean accepted length 5.00" in out and "draft model's proposals" in out
    assert "accepted len" in open(res["aggregate"]["table"]).read()


def test_builder_turns_speculation_off_where_it_cannot_run(caplog):
    from nanoslg.core.compose import compose_config
    from nanoslg.engine.builder import _speculative

    cfg, _ = compose_config(["speculative=ngram", "parallel=tp", "parallel.tp_size=2"])
    with caplog.at_level("WARNING"):
        assert _speculative(cfg).speculative.method == "none"
    assert "speculative=ngram is off" in caplog.text
    cfg, _ = compose_config(["speculative=ngram", "parallel=single"])
    on = _speculative(cfg)
    assert on.speculative.method == "ngram" and not on.scheduler.overlap
    with pytest.raises(Exception, match="draft.path"):
        compose_config(["speculative=draft"])


def test_draft_vocabulary_is_checked(tiny_llama, vocab16):
    from nanoslg.core.errors import ConfigError

    with pytest.raises(ConfigError, match="vocabulary"):
        LLM(f"model.path={tiny_llama}", "speculative=draft", f"speculative.draft.path={vocab16[1]}")
