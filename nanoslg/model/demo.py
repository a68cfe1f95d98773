"""The demo checkpoint: a small random-weight Llama with a real byte-level BPE tokenizer, built offline.

The tokenizer is trained with `tokenizers` on the Python standard library's own source text (always
on disk, no network). The checkpoint is written to a temp folder and renamed into place, so
concurrent first runs never see a half-written folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from nanoslg.core.machine import cache_root

log = logging.getLogger("nanoslg.demo")

VERSION = "demo-v2"  # v2: the chat template renders tools and tool calls
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4
PAD, BOS, EOS, IM_START, IM_END = range(5)
# ChatML. Tools (when a request has them) go first in a system turn, an assistant's calls follow its
# content as <tool_call> blocks (what server.tool_parser=hermes reads back); without tools the text is
# exactly the plain ChatML of each message.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n# Tools\\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}"
    '{% endfor %}{{ \'Call one as <tool_call>{\\"name\\": ..., \\"arguments\\": {...}}</tool_call>\' }}'
    "{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}{{ '<tool_call>' }}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{ '</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Standard-library files whose text trains the tokenizer (docstrings, comments and code: plenty of
# English and Python). Only files present are read, so any CPython layout works.
CORPUS_FILES = [
    "textwrap.py",
    "string.py",
    "json/__init__.py",
    "json/decoder.py",
    "argparse.py",
    "pathlib.py",
    "pathlib/__init__.py",
    "pathlib/_local.py",
    "typing.py",
    "functools.py",
    "dataclasses.py",
    "logging/__init__.py",
    "random.py",
    "statistics.py",
    "fractions.py",
    "datetime.py",
    "_pydatetime.py",
    "difflib.py",
    "calendar.py",
    "inspect.py",
]
EXTRA_TEXT = "héllo wörld, café naïve ünïcödé — 世界 你好 こんにちは 🙂\n"


def corpus(max_chars: int) -> list[str]:
    root = os.path.dirname(os.__file__)
    lines, n = [EXTRA_TEXT] * 8, 0
    for name in CORPUS_FILES:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                lines.append(line)
                n += len(line)
        if n >= max_chars:
            break
    return lines


def build_tokenizer(vocab_size: int = 4096, max_chars: int = 1_500_000):
    """A byte-level BPE tokenizer (every string round-trips) as a transformers PreTrainedTokenizerFast."""
    # Deferred: transformers takes seconds to import, and only the first run builds the demo.
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(max_chars), trainer)
    tok.post_processor = processors.TemplateProcessing(  # prepend BOS, like Llama tokenizers
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(
    vocab_size: int,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 704,
    max_pos: int = 2048,
) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.05,
        "torch_dtype": "float32",
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
    }


def random_llama_weights(cfg: dict, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """HF-named random weights for `llama_config` (norms = 1)."""
    g = torch.Generator().manual_seed(seed)
    h, i, v, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * std

    w = {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h), "lm_head.weight": rnd(v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        w.update(
            {
                p + "self_attn.q_proj.weight": rnd(q, h),
                p + "self_attn.k_proj.weight": rnd(kv, h),
                p + "self_attn.v_proj.weight": rnd(kv, h),
                p + "self_attn.o_proj.weight": rnd(h, q),
                p + "mlp.gate_proj.weight": rnd(i, h),
                p + "mlp.up_proj.weight": rnd(i, h),
                p + "mlp.down_proj.weight": rnd(h, i),
                p + "input_layernorm.weight": torch.ones(h),
                p + "post_attention_layernorm.weight": torch.ones(h),
            }
        )
    return w


def write_generation_config(path: str, bos: int = BOS, eos=(EOS, IM_END), pad: int = PAD) -> None:
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": list(eos), "pad_token_id": pad}, f, indent=2)


def ensure_demo_checkpoint(cache_dir: str | None = None) -> str:
    """The demo checkpoint folder, built on first use (default ~/.cache/nanoslg/demo-v2; root
    overridable with NANOSLG_CACHE)."""
    root = cache_dir or cache_root()
    final = os.path.join(root, VERSION)
    if os.path.isfile(os.path.join(final, "model.safetensors")):
        return final
    os.makedirs(root, exist_ok=True)
    log.info("building the demo checkpoint in %s (once)", final)
    tmp = tempfile.mkdtemp(prefix=f".{VERSION}-", dir=root)
    try:
        tok = build_tokenizer()
        tok.save_pretrained(tmp)
        cfg = llama_config(len(tok))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        write_generation_config(tmp)
        save_file(random_llama_weights(cfg), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not os.path.isfile(os.path.join(final, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
