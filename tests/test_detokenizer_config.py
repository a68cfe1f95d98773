"""Incremental detokenization and config validation (no model needed)."""

import pytest

from nanoslg.core.compose import compose_config
from nanoslg.core.errors import ConfigError
from nanoslg.engine.detokenizer import IncrementalDetokenizer


def test_detokenizer_never_splits_a_character(demo_tokenizer):
    tok = demo_tokenizer
    text = "héllo 世界 — ünïcödé 🙂 ok"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    pieces = [d.add(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def _spm_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace: leading spaces live in the tokens)."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator(["the quick brown fox jumps over the lazy dog", "héllo wörld 世界"] * 50, vocab_size=120)
    return PreTrainedTokenizerFast(tokenizer_object=spm._tokenizer, eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
@pytest.mark.parametrize("skip", [True, False])
def test_fast_detokenizer_equals_the_python_path(demo_tokenizer, kind, skip):
    """The DecodeStream path streams the same text as the decode-with-context path, token by token,
    from random ids (partial UTF-8 bytes and special tokens included) after a prompt."""
    import random

    tok = demo_tokenizer if kind == "byte-level" else _spm_tokenizer()
    if kind == "sentencepiece":
        tok.add_special_tokens({"additional_special_tokens": ["<x>"]})
    rng, streamed = random.Random(0), 0
    for _ in range(40):
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 9))]
        fast, slow = IncrementalDetokenizer(tok, prompt, skip), IncrementalDetokenizer(tok, prompt, skip)
        slow._fast = None
        streamed += fast._fast is not None  # not where the prompt ends inside a character
        for t in [rng.randrange(len(tok)) for _ in range(60)]:
            assert fast.add(t) == slow.add(t)
    assert streamed >= 20, "a fast tokenizer takes the DecodeStream path"


def test_default_config_composes():
    cfg, node = compose_config([])
    assert cfg.mode == "serve" and cfg.model.name == "demo" and cfg.cache.backend == "auto"
    assert cfg.parallel.mode == "auto" and cfg.scheduler.policy == "fcfs"


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.dtype=float64", "model.dtype"),
        ("mode=train", "mode"),
        ("cache.gpu_memory_utilization=1.5", "cache.gpu_memory_utilization"),
        ("scheduler.max_num_batched_tokens=0", "scheduler.max_num_batched_tokens"),
        ("cache.backend=magic", "cache.backend"),
        ("scheduler.policy=nope", "scheduler.policy"),
        ("parallel.tp_size=2", "parallel.mode"),
        ("model.sampling_kernels=cuda", "model.sampling_kernels"),
        ("model.blas=mkl", "model.blas"),
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        compose_config([override])
    assert "allowed" in str(e.value) or "must" in str(e.value) or "needs" in str(e.value)


def test_flashinfer_sampling_on_cpu_fails_clearly(tiny_llama):
    from nanoslg import LLM

    with pytest.raises(ConfigError, match="sampling_kernels=flashinfer needs a CUDA device"):
        LLM(f"model.path={tiny_llama}", "model.sampling_kernels=flashinfer")


def test_auto_sampling_kernels_are_torch_on_cpu(tiny_llama):
    from nanoslg import LLM

    with LLM(f"model.path={tiny_llama}") as llm:  # the default, model.sampling_kernels=auto
        assert llm.engine.info["sampling_kernels"] == "torch"


def test_unknown_key_and_type_fail_at_compose():
    with pytest.raises(ConfigError, match="model.colour is not a config key"):
        compose_config(["model.colour=red"])
    with pytest.raises(ConfigError, match="cache.page_size: Value 'big'"):
        compose_config(["cache.page_size=big"])


def test_unknown_key_lists_close_matches_and_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        compose_config(["scheduler.max_num_seq=4"])
    msg = str(e.value)
    assert "did you mean scheduler.max_num_seqs?" in msg
    assert (
        "The keys under scheduler: hold_lookahead, max_num_batched_tokens, max_num_seqs, overlap, policy, seed" in msg
    )
    with pytest.raises(ConfigError, match="did you mean prompt?.*The keys at the top level: .*mode"):
        compose_config(["promt=hi"])


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(ConfigError, match="sdpa") as e:
        compose_config(["cache=nonexistent"])
    assert "search path" not in str(e.value)
