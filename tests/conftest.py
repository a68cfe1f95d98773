"""Shared fixtures: tiny random Hugging Face checkpoints (saved by transformers, with a tokenizer and a
generation_config), the demo checkpoint, `hf_greedy` (transformers' own greedy decoding), and
`start_server` with the helpers of the server tests (`metric`, `sse_events`, MODEL, KEY); and the
engine tests' helpers (`prompts_for`, `greedy`), which test modules import from here.

The tiny models use a large initializer_range so their logits are decisive (no near-ties that float
noise could flip between engines).
"""

import os
import random
import signal
import zlib

import httpx
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NEW = 32  # tokens each engine test generates unless it says otherwise


def prompts_for(vocab: int, lengths=(3, 11, 26, 41), seed=0) -> list[list[int]]:
    """Random prompts of the given lengths, without the special ids (0..2)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def greedy(n: int = NEW, **kw):
    """Greedy sampling of exactly n tokens (EOS ignored), as transformers' reference generates them."""
    from nanoslg.core.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.2,
)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer (512 tokens), trained once per session."""
    from nanoslg.model.demo import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(vocab_size=512, max_chars=200_000).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def demo_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_checkpoint(root, name: str, tokenizer_dir, **overrides) -> str:
    """Saves a random transformers model (float32) with the session tokenizer; returns its folder."""
    import transformers
    from transformers import AutoTokenizer

    from nanoslg.model.demo import BOS, EOS, IM_END, PAD, write_generation_config

    kind = overrides.pop("kind", "llama")
    shard = overrides.pop("max_shard_size", None)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kw = {**TINY, "vocab_size": len(tok), "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, **overrides}
    torch.manual_seed(zlib.crc32(name.encode()))
    model = model_cls(cfg_cls(**kw)).to(torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):  # transformers zero-inits biases: make them matter
                p.normal_(0.0, kw["initializer_range"])
    path = os.path.join(root, name)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(path)
    write_generation_config(path, BOS, (EOS, IM_END), PAD)
    return path


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="session")
def tiny_llama(ckpt_root, tokenizer_dir):
    """Llama, GQA (4 heads / 2 KV heads), untied embeddings."""
    return make_checkpoint(ckpt_root, "tiny_llama", tokenizer_dir, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_llama_tied(ckpt_root, tokenizer_dir):
    return make_checkpoint(ckpt_root, "tiny_llama_tied", tokenizer_dir, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_llama3_rope(ckpt_root, tokenizer_dir):
    """llama3 rope scaling with a short original context, so the scaling changes every layer's rope."""
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    return make_checkpoint(
        ckpt_root,
        "tiny_llama3_rope",
        tokenizer_dir,
        tie_word_embeddings=False,
        rope_scaling=scaling,
        rope_theta=500000.0,
    )


@pytest.fixture(scope="session")
def tiny_qwen2(ckpt_root, tokenizer_dir):
    """Qwen2: q/k/v biases."""
    return make_checkpoint(ckpt_root, "tiny_qwen2", tokenizer_dir, kind="qwen2", tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_qwen3(ckpt_root, tokenizer_dir):
    """Qwen3: per-head q/k norm, explicit head_dim, tied embeddings."""
    return make_checkpoint(ckpt_root, "tiny_qwen3", tokenizer_dir, kind="qwen3", tie_word_embeddings=True, head_dim=32)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The demo checkpoint, built into a session folder (not the user's cache)."""
    from nanoslg.model.demo import ensure_demo_checkpoint

    return ensure_demo_checkpoint(str(tmp_path_factory.mktemp("nanoslg-cache")))


@pytest.fixture(scope="session")
def hf_greedy():
    """hf_greedy(path, prompt_ids, max_new_tokens) -> new token ids from transformers' greedy generate
    (float32, CPU, no EOS: it runs the full length)."""
    from transformers import AutoModelForCausalLM

    models = {}

    def run(path, prompt_ids, max_new_tokens):
        path = str(path)
        if path not in models:
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            # No EOS at all, so generate neither stops nor masks it (min_new_tokens would mask it,
            # which changes the argmax whenever EOS is the greedy pick): the engine uses ignore_eos.
            m.generation_config.eos_token_id = None
            models[path] = m
        m = models[path]
        ids = torch.tensor([list(prompt_ids)])
        with torch.no_grad():
            out = m.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=m.config.pad_token_id if m.config.pad_token_id is not None else 0,
            )
        return out[0, ids.shape[1] :].tolist()

    return run


@pytest.fixture
def clean_parallel_state():
    """Restores the one-process parallel state after a test that sets TP/PP by hand."""
    from nanoslg.core import dist as state

    old = state.get_state()
    yield state
    state.set_state(old)


# -- the server tests (tests/test_server*.py) ------------------------------------------------------
MODEL = "tiny"  # server.served_model_name of every server start_server starts
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def start_server():
    """start_server(*overrides, exit_code=0) -> a ready ServerProcess running `python run.py server.port=0
    server.served_model_name=tiny <overrides>` (the URL comes from its startup log line, so no port race).
    Each is stopped with SIGTERM at the end of the module; where exit_code is not None it must exit so."""
    from nanoslg.bench.serving import ServerProcess

    started = []

    def start(*overrides: str, exit_code=0):
        srv = ServerProcess(
            ["server.port=0", f"server.served_model_name={MODEL}", *overrides],
            start_timeout=180.0,
            env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        srv.start()
        started.append((srv, exit_code))
        return srv

    yield start
    stopped = [(srv, srv.stop(signal.SIGTERM, timeout=30.0), want) for srv, want in reversed(started)]
    for srv, code, want in stopped:  # every server is stopped before any assertion fails
        if want is not None:
            assert code == want, srv.output()[-3000:]


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample from /metrics (`labels` is a substring of the label set, e.g. finished_reason="abort")."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} {labels} not in /metrics:\n{text}")


def sse_events(body: str) -> list[str]:
    """Splits an SSE body exactly as load tools do; every event must be `data: ...`."""
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    events = body.split("\n\n")
    assert events[-1] == ""
    for e in events[:-1]:
        assert e.startswith("data: ") and "\n" not in e, e
    return [e[len("data: ") :] for e in events[:-1]]
