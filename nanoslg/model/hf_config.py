"""`ModelArgs`: what the model code needs from a checkpoint's config.json.

Read from the raw json (not transformers' AutoConfig) so configs written by transformers 4.x
(`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`, which also holds `rope_theta`) both work.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from nanoslg.core.errors import ConfigError
from nanoslg.core.registry import ARCHITECTURES

SHAPES_DIR = os.path.join(os.path.dirname(__file__), "shapes")
_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": ..., factor, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2: always)
    o_bias: bool = False  # bias on o_proj (Llama/Qwen3 `attention_bias`)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before rope
    torch_dtype: torch.dtype = torch.float32  # the checkpoint's dtype
    bos_token_id: int | None = None
    eos_token_id: Any = None  # int, list of ints, or None
    quantization: dict | None = None  # config.json's quantization_config, as written

    @classmethod
    def from_dict(cls, c: dict) -> ModelArgs:
        archs = c.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"config.json architectures={archs!r} is not supported; supported: {', '.join(ARCHITECTURES.names())}"
            )
        heads = c["num_attention_heads"]
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or c.get("rope_theta") or 10000.0
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rope:
            rope["rope_type"] = rtype
        dtype_name = str(c.get("torch_dtype") or c.get("dtype") or "float32").replace("torch.", "")
        qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope if rope and rtype != "default" else None,
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=qwen2 or bool(c.get("attention_bias", False)),
            o_bias=not qwen2 and bool(c.get("attention_bias", False)),
            mlp_bias=bool(c.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            torch_dtype=_DTYPES.get(dtype_name, torch.float32),
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=c.get("eos_token_id"),
            quantization=c.get("quantization_config"),
        )


def load_args(path: str) -> ModelArgs:
    """`path`: a checkpoint folder (with config.json) or a config.json file."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"model.path={path!r} has no config.json")
    with open(file) as f:
        return ModelArgs.from_dict(json.load(f))


def shape_path(name: str) -> str:
    """The bundled config.json of a known shape (for load_format=dummy without a download)."""
    file = os.path.join(SHAPES_DIR, f"{name}.json")
    if not os.path.isfile(file):
        names = sorted(f[:-5] for f in os.listdir(SHAPES_DIR) if f.endswith(".json"))
        raise ConfigError(f"model.shape={name!r} is not bundled; allowed: {', '.join(names)}")
    return file
