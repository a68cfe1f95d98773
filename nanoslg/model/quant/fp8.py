"""FP8 linear layers (`model.quantization=fp8`): float8_e4m3fn weights with one scale per output
channel; activations quantized at run time, per token (or with a checkpoint's static scale).

Where the weights come from:
- a float checkpoint (bf16, fp16, fp32): quantized at load, per output channel, scale = amax / 448
  (of the whole row: a row-parallel layer's ranks agree on it, so TP changes no weight);
- a checkpoint saved in FP8 (config.json `quantization_config.quant_method: "fp8"`): `weight` in
  float8_e4m3fn and `weight_scale` per tensor ([] or [1]) or per output channel ([out] or [out, 1]);
  `activation_scheme: "static"` adds a per-tensor `input_scale`. The per-tensor scales of a fused
  projection's shards (q, k, v; gate, up) differ, so each is spread over its shard's channels: every
  layer then runs with per-channel weight scales. Block-wise scales (`weight_block_size`) have no
  kernel here and are refused by name.

y = (q_x * s_x) @ (q_w * s_w)^T. On GPUs of compute capability 8.9+ a few rows (decode) run through a
skinny Triton kernel that rounds x itself (kernels/fp8.py); more rows run as torch._scaled_mm with
row-wise scales (9.0+) or with the scales applied after (8.9). Elsewhere (the CPU path of CI)
`fp8_linear_torch` computes the same product from the same rounded values in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoslg.core.dist import tp_all_reduce_max
from nanoslg.core.errors import ConfigError
from nanoslg.core.registry import QUANTIZATION
from nanoslg.model.quant.base import QuantMethod, add_param, check_ignored, replace_param, use_kernels

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
MIN_SCALE = 1e-12  # an all-zero row quantizes to zeros, not NaN


def quantize_weight(w: torch.Tensor, whole_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (float8 [out, in], scale [out] float32), one scale per output channel.
    whole_rows: w holds this rank's columns of a row-parallel layer; the scale is the whole row's
    (a max over the TP group), so the quantized model does not depend on the TP layout."""
    wf = w.float()
    amax = tp_all_reduce_max(wf.abs().amax(dim=1)) if whole_rows else wf.abs().amax(dim=1)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    return (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_act(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (float8 [T, K], scale [T, 1] float32): per token, or one static scale for all."""
    xf = x.float()
    if static_scale is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    else:
        scale = static_scale.float().reshape(1, 1).expand(xf.shape[0], 1)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear_torch(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, in_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference: both sides rounded to FP8 as the kernel sees them, multiplied in float32."""
    q, s = quantize_act(x, in_scale)
    return ((q.float() @ w.float().t()) * s * w_scale.float()).to(x.dtype)


def fp8_kernel(w: torch.Tensor) -> str:
    """The GEMM a layer of weight w [N, K] runs: rowwise (SM90+), tensorwise (SM89), or torch."""
    if not use_kernels(w) or not hasattr(torch, "_scaled_mm") or w.shape[0] % 16 or w.shape[1] % 16:
        return "torch"
    cap = torch.cuda.get_device_capability(w.device)
    if cap >= (9, 0):
        return "rowwise"
    return "tensorwise" if cap >= (8, 9) else "torch"


KERNEL_NAMES = {
    "rowwise": "Triton skinny GEMM (few rows), torch._scaled_mm with row-wise scales (more)",
    "tensorwise": "Triton skinny GEMM (few rows), torch._scaled_mm with scales applied after (more)",
    "torch": "plain-torch reference (dequantize)",
}


def _shard_slot(layer: nn.Module, shard_id) -> int:
    if shard_id is None:
        return 0
    ids = getattr(layer, "shard_ids", None)
    return ids.index(shard_id) if ids else int(shard_id)


def _num_shards(layer: nn.Module) -> int:
    return len(getattr(layer, "shard_ids", None) or getattr(layer, "output_sizes", None) or [0])


def load_weight_scale(layer: nn.Module, param: nn.Parameter, loaded, shard_id) -> None:
    """A checkpoint's weight_scale into this rank's per-channel scales [out]."""
    t = loaded[...].float()
    if t.dim() == 2 and t.shape[1] != 1:
        raise ConfigError(f"weight_scale of shape {tuple(t.shape)} is block-wise; only per-tensor and per-channel")
    t = t.reshape(-1)
    if layer.split == "column":
        off, size, start, full = layer.out_shard(shard_id)
    else:
        off, size, start, full = 0, layer.out_features, 0, layer.out_features
    if t.numel() == 1:
        param.data[off : off + size] = t[0]
    elif t.numel() == full:
        param.data[off : off + size] = t[start : start + size]
    else:
        raise ConfigError(f"weight_scale has {t.numel()} values; per tensor it has 1, per channel {full}")


def load_input_scale(layer: nn.Module, param: nn.Parameter, loaded, shard_id) -> None:
    t = loaded[...].float().reshape(-1)
    if t.numel() != 1:
        raise ConfigError(f"input_scale has {t.numel()} values; a static activation scale is one per tensor")
    param.data[_shard_slot(layer, shard_id)] = t[0]


def _one_row_in_kernel(layer: nn.Module, x: torch.Tensor) -> bool:
    """x is one row that `layer`'s skinny kernel quantizes itself (per token, no static scale)."""
    return layer.fp8_kernel != "torch" and x.shape[0] == 1 and layer.act_scale is None


@QUANTIZATION.register("fp8")
class Fp8Method(QuantMethod):
    name = "fp8"

    def __init__(self, serialized: bool, static: bool):
        super().__init__()
        self.serialized = serialized  # the checkpoint holds FP8 weights (else: quantize float weights at load)
        self.static = static  # activations use the checkpoint's input_scale (else: per token)

    @classmethod
    def from_config(cls, qcfg: dict | None, load_format: str) -> Fp8Method:
        if qcfg is None:
            return cls(serialized=False, static=False)
        block = qcfg.get("weight_block_size")
        if block:
            raise ConfigError(
                f"config.json quantization_config.weight_block_size={block}: block-wise FP8 weight scales are "
                "not supported (no kernel for them here); supported: per-tensor and per-channel weight_scale"
            )
        scheme = qcfg.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ConfigError(f"config.json quantization_config.activation_scheme={scheme!r}; allowed: dynamic, static")
        check_ignored("fp8", "ignored_layers", qcfg.get("ignored_layers") or qcfg.get("modules_to_not_convert"))
        # Random weights (load_format=dummy) are drawn in float and quantized like a float checkpoint's.
        return cls(serialized=load_format != "dummy", static=scheme == "static" and load_format != "dummy")

    def settings(self) -> str:
        src = "float8 weights from the checkpoint" if self.serialized else "weights quantized to float8 at load"
        act = "static activation scale" if self.static else "activations quantized per token"
        return f"fp8 ({src}, per-channel scales; {act})"

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        if not self.serialized:  # float weights, quantized in process()
            add_param(layer, "weight", torch.empty(out_features, in_features), output_dim=0, input_dim=1)
            return
        add_param(
            layer, "weight", torch.empty(out_features, in_features, dtype=FP8), output_dim=0, input_dim=1,
            checkpoint_dtype=FP8,
        )  # fmt: skip
        scale = add_param(layer, "weight_scale", torch.ones(out_features, dtype=torch.float32))
        scale.quant_loader = load_weight_scale
        if self.static:
            inp = add_param(layer, "input_scale", torch.zeros(_num_shards(layer), dtype=torch.float32))
            inp.quant_loader = load_input_scale

    def process(self, layer: nn.Module) -> None:
        if not self.serialized:
            q, scale = quantize_weight(layer.weight.data, whole_rows=layer.split == "row")
            replace_param(layer, "weight", q)
            layer.register_buffer("weight_scale", scale)
        layer.act_scale = None
        if self.static:  # one scale for the fused input: the largest of its shards', as they were calibrated
            layer.act_scale = layer.input_scale.data.max().reshape(1)
        layer.fp8_kernel = fp8_kernel(layer.weight)
        if layer.fp8_kernel != "torch":
            from nanoslg.model.quant.kernels import fp8 as gpu  # deferred: imports Triton

            # The skinny kernel's K splits count themselves done here; the layer's own, as AWQ's.
            layer.register_buffer("split_counts", gpu.split_counts(layer.weight.shape[0], layer.weight.device), False)
        self.kernels[KERNEL_NAMES[layer.fp8_kernel]] += 1

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer.fp8_kernel == "torch":
            return fp8_linear_torch(x, layer.weight, layer.weight_scale, layer.act_scale)
        from nanoslg.model.quant.kernels import fp8 as gpu  # deferred: imports Triton

        return gpu.fp8_linear(
            x, layer.weight, layer.weight_scale, layer.act_scale, layer.fp8_kernel, counts=layer.split_counts
        )

    def apply_silu_mul(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
        # One row quantized per token (batch-1 decode): the skinny kernel computes the activation as it
        # loads its input, with the activation kernel's bits, and saves that kernel's launch.
        if not _one_row_in_kernel(layer, h):
            return None
        from nanoslg.model.quant.kernels import fp8 as gpu  # deferred: imports Triton

        w, s = layer.weight, layer.weight_scale
        return gpu.fp8_linear(h, w, s, None, layer.fp8_kernel, counts=layer.split_counts, silu_mul=True)

    def apply_mlp(self, gate_up: nn.Module, down: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        # One row (batch-1 decode): gate_up's kernel computes silu(gate) * up and hands down the row's
        # absolute max, so down does not pass over [gate | up] first; the same bits as the three apart.
        if gate_up.bias is not None or not (_one_row_in_kernel(gate_up, x) and _one_row_in_kernel(down, x)):
            return None
        from nanoslg.model.quant.kernels import fp8 as gpu  # deferred: imports Triton

        w1, s1, w2, s2 = gate_up.weight, gate_up.weight_scale, down.weight, down.weight_scale
        return gpu.fp8_mlp_one_row(x, w1, s1, w2, s2, counts=down.split_counts)

    def linear_bytes(self, out_features: int, in_features: int, elem: int) -> int:
        return out_features * in_features + 4 * out_features  # float8 weight, float32 scale per channel
