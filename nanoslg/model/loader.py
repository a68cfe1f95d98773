"""Builds a model from a checkpoint folder: safetensors weights (this rank's TP slices only), or random
weights of the right shapes (`load_format=dummy`)."""

from __future__ import annotations

import json
import os
import re
import zlib

import torch
from safetensors import safe_open
from tqdm import tqdm

from nanoslg.core.config import check_choice
from nanoslg.core.dist import get_state
from nanoslg.core.errors import ConfigError
from nanoslg.core.registry import ARCHITECTURES
from nanoslg.model.hf_config import ModelArgs, load_args
from nanoslg.model.layers import LinearBase
from nanoslg.model.quant.base import QuantMethod, resolve_quantization

# HF name piece -> (our fused parameter piece, shard id)
STACKED = [
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
]
STACKED_OF = {hf: ours for hf, ours, _ in STACKED}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
# FP8 checkpoints name their per-layer KV-cache scales in several ways; ours are self_attn.{k,v}_scale.
KV_SCALES = {
    ".self_attn.k_proj.output_scale": (".self_attn.k_scale",),
    ".self_attn.v_proj.output_scale": (".self_attn.v_scale",),
    ".self_attn.k_scale": (".self_attn.k_scale",),
    ".self_attn.v_scale": (".self_attn.v_scale",),
    ".self_attn.kv_scale": (".self_attn.k_scale", ".self_attn.v_scale"),
}


def default_weight_loader(param: torch.nn.Parameter, loaded, shard_id=None) -> None:
    """For parameters whole on every rank (norms)."""
    t = loaded[...]
    if tuple(t.shape) != tuple(param.shape):
        raise ConfigError(f"checkpoint tensor of shape {tuple(t.shape)} does not fit parameter {tuple(param.shape)}")
    param.data.copy_(t)


def resolve_dtype(dtype: str | torch.dtype, args: ModelArgs, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype the model runs in, and why (for the start-up log). The one place `auto` is decided."""
    if isinstance(dtype, torch.dtype):
        return dtype, "given"
    check_choice("model.dtype", dtype)
    if dtype != "auto":
        return getattr(torch, dtype), "set by model.dtype"
    if device.type == "cpu":
        return torch.float32, "auto on CPU: float32 (bf16 matmuls are slow and inexact there)"
    # A float32 checkpoint still runs in bf16 on the GPU: the fast kernels (FlashInfer) need 16 bits.
    dt = args.torch_dtype if args.torch_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    return dt, f"auto on GPU: the checkpoint's {str(args.torch_dtype).replace('torch.', '')}"


def load_model(
    path: str | ModelArgs | None,
    args: ModelArgs | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    load_format: str = "auto",
    seed: int = 0,
    quantization: str = "none",
    dummy_init: str = "normal",
) -> torch.nn.Module:
    """`path`: a checkpoint folder, or ModelArgs alone (then load_format must be dummy).
    load_format: auto|safetensors read the weights; dummy makes seeded random ones.
    quantization: none|fp8|awq (model.quantization; a quantized checkpoint picks its own method).
    dummy_init: normal|fan_in, the random weights' spread (model.dummy_init)."""
    if isinstance(path, ModelArgs):
        path, args = None, path
    if args is None:
        if path is None:
            raise ConfigError("load_model needs a checkpoint path or ModelArgs")
        args = load_args(path)
    if path is None and load_format != "dummy":
        raise ConfigError("model.load_format must be dummy when there is no checkpoint path")
    device = torch.device(device)
    dtype, _ = resolve_dtype(dtype, args, device)
    check_choice("model.load_format", load_format)
    check_choice("model.dummy_init", dummy_init)
    quant = resolve_quantization(quantization, args.quantization, load_format)
    cls = ARCHITECTURES.get(args.architecture)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(args, quant=quant)
    finally:
        torch.set_default_dtype(old)
    if load_format == "dummy":
        init_dummy(model, seed, dummy_init)
    else:
        load_weights(model, path)
    if quant is not None:
        for m in model.modules():
            if isinstance(m, LinearBase):
                quant.process(m)
        if device.type == "cuda":  # the float weights quantized at load are gone: hand their memory back
            torch.cuda.empty_cache()
    return model.eval().requires_grad_(False)


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if any(not n.startswith("consolidated") for n in names):  # Mistral repos ship both layouts
            names = [n for n in names if not n.startswith("consolidated")]
    if not names:
        raise ConfigError(f"no *.safetensors in {path}; use model.load_format=dummy for random weights")
    return [os.path.join(path, n) for n in names]


def targets(name: str, model, params: dict) -> list[tuple[str, object]]:
    """Our (parameter name, shard id) pairs for a checkpoint tensor name; [] to skip it."""
    if "rotary_emb.inv_freq" in name:
        return []
    m = _LAYER.match(name)
    if m and not model.first_layer <= int(m.group(1)) < model.last_layer:
        return []  # another pipeline stage's layer
    if model.args.tie_word_embeddings and name in ("model.embed_tokens.weight", "lm_head.weight"):
        # One tensor feeds both ends; a stage that has only the LM head loads it there.
        return [(n, None) for n in ("model.embed_tokens.weight", "lm_head.weight") if n in params]
    if name.startswith("model.embed_tokens.") and model.model.embed_tokens is None:
        return []  # the first stage's
    if name.startswith(("model.norm.", "lm_head.")) and model.lm_head is None:
        return []  # the last stage's
    for theirs, ours in KV_SCALES.items():
        if name.endswith(theirs):
            return [(name[: -len(theirs)] + o, None) for o in ours]
    for hf, ours, shard in STACKED:
        if hf in name:
            return [(name.replace(hf, ours), shard)]
    return [(name, None)]


def load_tensor(params: dict, pname: str, loaded, shard, name: str) -> None:
    """Runs the parameter's weight_loader; its errors name the checkpoint tensor."""
    param = params[pname]
    loader = getattr(param, "weight_loader", default_weight_loader)
    try:
        loader(param, loaded) if shard is None else loader(param, loaded, shard)
    except ConfigError as e:
        raise ConfigError(f"checkpoint tensor {name}: {e}") from None


def loadable(model) -> dict:
    """Parameters, and the buffers a checkpoint may fill (FP8 KV-cache scales; optional)."""
    kv = {n: b for n, b in model.named_buffers() if n.endswith(("self_attn.k_scale", "self_attn.v_scale"))}
    return {**dict(model.named_parameters()), **kv}


@torch.no_grad()
def load_weights(model, path: str) -> None:
    params = loadable(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    st = get_state()
    files = safetensors_files(path)
    for file in tqdm(files, desc="loading weights", disable=(st.tp_rank or st.pp_rank) != 0):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                for pname, shard in targets(name, model, params):
                    if pname not in params:  # e.g. a bias the config says the model has not
                        unexpected.append(name)
                        continue
                    load_tensor(params, pname, f.get_slice(name), shard, name)
                    loaded.add(pname if shard is None else f"{pname}#{shard}")
    if unexpected:
        raise ConfigError(
            f"checkpoint {path} has weights the {model.args.architecture} model (as its config.json "
            f"describes it) does not use: {', '.join(sorted(unexpected)[:8])}"
        )
    model.kv_scales_loaded = sum(1 for n in loaded if n.endswith(("k_scale", "v_scale")))
    need = {}  # what must be loaded -> the checkpoint name to report if it is not
    for pname in dict(model.named_parameters()):
        stacked = [(hf, s) for hf, ours, s in STACKED if ours in pname]
        for hf, s in stacked:
            need[f"{pname}#{s}"] = pname.replace(STACKED_OF[hf], hf)
        if not stacked:
            need[pname] = pname
    missing = sorted(v for k, v in need.items() if k not in loaded)
    if missing:
        raise ConfigError(
            f"checkpoint {path} lacks weights the model needs: {', '.join(missing[:8])}"
            + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
        )


@torch.no_grad()
def hf_weight_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor a model of this config.json has, with its full (unsharded) shape."""
    h, d, inter = args.hidden_size, args.head_dim, args.intermediate_size
    q, kv = args.num_heads * d, args.num_kv_heads * d
    shapes = {"model.embed_tokens.weight": (args.vocab_size, h), "model.norm.weight": (h,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (inter, h),
            "mlp.up_proj.weight": (inter, h),
            "mlp.down_proj.weight": (h, inter),
        }
        if args.attention_bias:
            layer.update(
                {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
            )
        if args.o_bias:
            layer["self_attn.o_proj.bias"] = (h,)
        if args.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,), "mlp.down_proj.bias": (h,)})
        if args.qk_norm:
            layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
        shapes.update({p + k: v for k, v in layer.items()})
    return shapes


@torch.no_grad()
def init_dummy(model, seed: int, init: str = "normal") -> None:
    """Seeded random weights: small-std normal (bf16 stays finite through many layers), norms = 1;
    init=normal: std 0.02, fan_in: std 0.5/sqrt(the tensor's last dimension) (model.dummy_init).

    Each full checkpoint tensor is drawn from (seed, its name) and then sliced by the same
    weight_loaders as real weights, so every TP/PP split of one seed holds the same model.
    """
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    quant: QuantMethod | None = model.quant
    for name, shape in hf_weight_shapes(model.args).items():
        pairs = targets(name, model, params)
        if not pairs:
            continue
        gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        tensors = quant.dummy_tensors(shape, device, gen) if quant is not None and _LINEAR.search(name) else None
        if tensors is None:
            dtype = params[pairs[0][0]].dtype
            if name.endswith("norm.weight"):
                tensors = {"weight": torch.ones(shape, dtype=dtype, device=device)}
            else:
                std = 0.02 if init == "normal" else 0.5 / shape[-1] ** 0.5
                tensors = {"weight": torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)}
        for suffix, full in tensors.items():  # a quantized linear's tensors replace its `weight`
            for pname, shard in pairs:
                pname, ckpt = (pname[:-6] + suffix, name[:-6] + suffix) if suffix != "weight" else (pname, name)
                load_tensor(params, pname, full, shard, ckpt)


def weight_bytes(args: ModelArgs, quant: QuantMethod | None, elem: int) -> tuple[int, int]:
    """(bytes of the whole model's weights as stored, bytes a step reads): every tensor of the
    checkpoint's shapes, linear weights as the quantization method stores them; a step reads all but
    an untied input embedding table (a lookup touches only the batch's rows)."""
    total = embed = 0
    for name, shape in hf_weight_shapes(args).items():
        if quant is not None and _LINEAR.search(name):
            n = quant.linear_bytes(shape[0], shape[1], elem)
        else:
            n = elem * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        total += n
        if name == "model.embed_tokens.weight" and not args.tie_word_embeddings:
            embed = n
    return total, total - embed
