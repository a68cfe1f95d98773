"""The tests' own quantizer: turns a tiny float checkpoint into an FP8 or AWQ one, and writes beside it
the DEQUANTIZED weights as a plain float32 checkpoint for transformers to run.

Written apart from nanoslg/model/quant/ (its own rounding, packing and dequantization), so a packing
or scale bug in either shows up as a difference between the engine and transformers.
"""

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
E4M3_MAX = 448.0
PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a packed int32 holds column PACK_ORDER[i]


def _copy_folder(src: str, dst: str, weights: dict, quantization_config: dict | None) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    save_file(weights, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return dst


# -- FP8 ----------------------------------------------------------------------------------------------
def fp8_round(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w / scale to float8_e4m3fn (saturating)."""
    return torch.clamp(w.double() / scale.double(), -E4M3_MAX, E4M3_MAX).float().to(torch.float8_e4m3fn)


def fp8_scales(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    amax = w.abs().amax(dim=1) if per_channel else w.abs().max().reshape(1)
    return (amax.float() / E4M3_MAX).clamp(min=1e-12)


def _quantize_linears(src: str, quantize) -> tuple[dict, dict]:
    """(the quantized checkpoint's tensors, the dequantized reference's): each linear weight goes through
    quantize(key, weight) -> (checkpoint entries, reference tensor); every other tensor stays as it is."""
    quant, ref = {}, {}
    for key, t in load_file(os.path.join(src, "model.safetensors")).items():
        if not LINEAR.search(key):
            quant[key] = ref[key] = t
            continue
        entries, ref[key] = quantize(key, t)
        quant.update(entries)
    return quant, ref


def make_fp8(src: str, root: str, name: str, mode: str, kv_scales: bool = False) -> tuple[str, str]:
    """mode: "float" (the engine quantizes at load; no FP8 checkpoint is written, only the reference),
    "tensor" or "channel" (a checkpoint saved in FP8 with per-tensor or per-channel weight_scale).
    Returns (the checkpoint for the engine, the dequantized float32 checkpoint for transformers)."""

    def quantize(key: str, t: torch.Tensor) -> tuple[dict, torch.Tensor]:
        scale = fp8_scales(t, per_channel=mode != "tensor")
        q = fp8_round(t, scale[:, None] if scale.numel() > 1 else scale)
        entries = {key: q}
        if mode != "float":
            entries[key.replace(".weight", ".weight_scale")] = (
                scale[:, None] if mode == "channel" else scale.reshape(())
            )
        return entries, (q.float() * (scale[:, None] if scale.numel() > 1 else scale)).contiguous()

    quant, ref = _quantize_linears(src, quantize)
    ref_dir = _copy_folder(src, os.path.join(root, f"{name}-dequantized"), ref, None)
    if mode == "float":
        return src, ref_dir
    if kv_scales:  # per-layer KV-cache scales, as some FP8 checkpoints carry them
        for i in range(json.load(open(os.path.join(src, "config.json")))["num_hidden_layers"]):
            quant[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.5 + 0.1 * i)
            quant[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.25 + 0.1 * i)
    qcfg = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    return _copy_folder(src, os.path.join(root, name), quant, qcfg), ref_dir


def fake_quant_act(x: torch.Tensor, parts: int = 1) -> torch.Tensor:
    """What the engine's FP8 layers do to their input: per token to float8_e4m3fn and back. parts > 1:
    a row-parallel layer under tensor parallelism, each rank quantizing its slice of the features."""
    if parts > 1:
        return torch.cat([fake_quant_act(c) for c in x.chunk(parts, dim=-1)], dim=-1)
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    q = torch.clamp(x.float() / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


# -- AWQ ----------------------------------------------------------------------------------------------
def awq_quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (values [in, out], zeros [in/group, out], scales float16 [in/group, out]):
    asymmetric round-to-nearest per group of `group` input features, as AutoAWQ stores it."""
    out, inp = w.shape
    wg = w.t().reshape(inp // group, group, out).double()  # [groups, group, out]
    lo, hi = wg.amin(dim=1), wg.amax(dim=1)
    scales = ((hi - lo).clamp(min=1e-5) / 15).to(torch.float16)
    s = scales.double()
    zeros = torch.clamp(torch.round(-lo / s), 0, 15)
    values = torch.clamp(torch.round(wg / s[:, None]) + zeros[:, None], 0, 15)
    return values.reshape(inp, out).to(torch.int32), zeros.to(torch.int32), scales


def awq_pack(v: torch.Tensor) -> torch.Tensor:
    """int [rows, cols] of 4-bit values -> int32 [rows, cols/8] in AutoAWQ's order."""
    rows, cols = v.shape
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i, col in enumerate(PACK_ORDER):
        packed |= v[:, col::8].to(torch.int64) << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the bits, as int32


def make_awq(src: str, root: str, name: str, group: int) -> tuple[str, str]:
    """An AutoAWQ GEMM checkpoint (float16 scales, biases and other tensors as they were) and the
    dequantized float32 reference. Returns (awq checkpoint, reference checkpoint)."""

    def quantize(key: str, t: torch.Tensor) -> tuple[dict, torch.Tensor]:
        values, zeros, scales = awq_quantize(t, group)
        deq = (values - zeros.repeat_interleave(group, 0)).double() * scales.double().repeat_interleave(group, 0)
        base = key[: -len("weight")]
        entries = {base + "qweight": awq_pack(values), base + "qzeros": awq_pack(zeros), base + "scales": scales}
        return entries, deq.t().float().contiguous()

    quant, ref = _quantize_linears(src, quantize)
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    ref_dir = _copy_folder(src, os.path.join(root, f"{name}-dequantized"), ref, None)
    return _copy_folder(src, os.path.join(root, name), quant, qcfg), ref_dir
