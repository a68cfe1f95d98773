"""The seam between the linear layers and the quantization methods.

A method (one file in this package, registered in QUANTIZATION) decides what a linear layer stores
and how it multiplies; the layer (nanoslg/model/layers.py) calls only these:

- `create_weights(layer, in_features, out_features)` registers this rank's parameters. Each carries
  the attributes the layer's `weight_loader` reads to take this rank's slice of a checkpoint tensor:
  `output_dim` / `input_dim` (which axis holds output / input features, None if neither),
  `output_pack` (output features per stored element: 8 for int4 packed in int32) and `input_unit`
  (input features per stored row: the group size for per-group scales). A parameter the generic
  slicing cannot load (a per-tensor scale of a fused projection) has a `quant_loader` instead.
- `process(layer)` runs once after loading: quantize, repack for the kernel, pick the kernel.
- `apply(layer, x)`: x [T, in] -> [T, out], without the bias (the layer adds it after any reduce).
- `apply_silu_mul(down, h)` and `apply_mlp(gate_up, down, x)` (optional): the MLP's activation fused
  into down's kernel, or the whole MLP in kernels of the method's own; None where it has none.

Norms, embeddings and the LM head are never quantized.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from nanoslg.core.errors import ConfigError
from nanoslg.core.registry import QUANTIZATION

_KERNELS = True


def set_kernels(enabled: bool) -> None:
    """Tests turn the GPU kernels off (for layers built from then on) to compare against the torch path."""
    global _KERNELS
    _KERNELS = enabled


def use_kernels(t: torch.Tensor) -> bool:
    return _KERNELS and t.is_cuda


class QuantMethod:
    name = "base"

    def __init__(self) -> None:
        self.kernels: Counter = Counter()  # kernel name -> layers that chose it (for the start-up log)

    @classmethod
    def from_config(cls, qcfg: dict | None, load_format: str) -> QuantMethod:
        """qcfg: config.json's quantization_config (None: the checkpoint is not quantized)."""
        raise NotImplementedError

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        raise NotImplementedError

    def process(self, layer: nn.Module) -> None:
        """After loading."""

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_silu_mul(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of h = [gate | up], times the layer's weight, in one kernel; None where the
        method has none for h (the caller then runs the activation on its own and `apply`)."""
        return None

    def apply_mlp(self, gate_up: nn.Module, down: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """down(silu(gate) * up) of x, before down's reduce and bias, where the method runs the MLP in
        kernels of its own for x; None: the caller runs gate_up, then down's `apply_silu_mul` path."""
        return None

    def linear_bytes(self, out_features: int, in_features: int, elem: int) -> int:
        """Bytes one whole (unsharded) linear weight takes as this method stores it."""
        raise NotImplementedError

    def dummy_tensors(self, shape: tuple[int, int], device, gen: torch.Generator) -> dict[str, torch.Tensor] | None:
        """Random checkpoint tensors of one linear weight of `shape` (out, in): {name suffix: whole
        tensor}. None: the loader draws a float weight, which `process` then quantizes."""
        return None

    def describe(self) -> str:
        """The method, its settings and the kernels the layers chose, for the start-up log."""
        used = ", ".join(f"{k} ({n} layers)" for k, n in sorted(self.kernels.items())) or "no layers"
        return f"{self.settings()}; kernels: {used}"

    def settings(self) -> str:
        return self.name


def add_param(layer: nn.Module, name: str, data: torch.Tensor, **attrs) -> nn.Parameter:
    """Registers a frozen parameter loaded through the layer's weight_loader, with slicing attributes."""
    p = nn.Parameter(data, requires_grad=False)
    p.weight_loader = layer.weight_loader
    for k, v in {"output_dim": None, "input_dim": None, "output_pack": 1, "input_unit": 1, **attrs}.items():
        setattr(p, k, v)
    layer.register_parameter(name, p)
    return p


def replace_param(layer: nn.Module, name: str, data: torch.Tensor) -> None:
    """Swaps a parameter for processed data (a new dtype or layout), dropping the loaded one."""
    delattr(layer, name)
    layer.register_parameter(name, nn.Parameter(data, requires_grad=False))


def check_ignored(method: str, key: str, names) -> None:
    """A checkpoint may leave modules unquantized; only the LM head (never quantized here) is taken."""
    kept = [n for n in (names or []) if not str(n).endswith("lm_head")]
    if kept:
        raise ConfigError(
            f"config.json quantization_config.{key}={kept[:4]!r}: {method} checkpoints that leave layers "
            "other than lm_head unquantized are not supported"
        )


def resolve_quantization(requested: str, qcfg: dict | None, load_format: str) -> QuantMethod | None:
    """The method a run uses: the checkpoint's own (config.json quantization_config.quant_method) or
    model.quantization; a clear error when they disagree. None: plain linears."""
    ckpt = str(qcfg.get("quant_method", "")).lower() if qcfg else None
    if ckpt is not None and ckpt not in QUANTIZATION:
        raise ConfigError(
            f"config.json quantization_config.quant_method={ckpt!r} is not supported; "
            f"supported: {', '.join(QUANTIZATION.names())}"
        )
    if requested not in ("none", None) and ckpt and requested != ckpt:
        raise ConfigError(
            f"model.quantization={requested} does not match the checkpoint, whose config.json says "
            f"quantization_config.quant_method={ckpt!r}; set model.quantization={ckpt} (or none, which follows "
            "the checkpoint)"
        )
    name = ckpt or (requested if requested not in ("none", None) else None)
    if name is None:
        return None
    return QUANTIZATION.get(name).from_config(qcfg if ckpt else None, load_format)
