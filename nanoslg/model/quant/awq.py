"""AWQ int4 linear layers (`model.quantization=awq`): AutoAWQ checkpoints of the GEMM format.

A checkpoint (config.json `quantization_config`: `quant_method: "awq"`, `bits: 4`, `group_size`,
`zero_point: true`, `version: "gemm"`) stores per linear layer, with the input features first:
- `qweight` int32 [in, out / 8]: eight 4-bit values per int32, in AWQ's interleaved order (the value
  of output column 8c + AWQ_ORDER[i] sits in bits 4i..4i+3 of packed column c);
- `qzeros` int32 [in / group, out / 8]: the zero points, packed the same way;
- `scales` float16 [in / group, out]; and the weight is (q - zero) * scale per group of input rows.

Tensor parallelism slices the packed tensors as they are: a column-parallel layer takes whole packed
output columns (a shard's outputs must be a multiple of 8), a row-parallel one whole groups of input
rows (its inputs must be a multiple of the group size).

At load the values are repacked along the input features (qweight [in / 8, out], value k of a column
in bits 4 (k % 8)..; zero points one byte each [in / group, out]): the layout the Triton kernels
read (kernels/awq.py), and the one `dequantize` reads for the plain-torch path (CPU, CI).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoslg.core.errors import ConfigError
from nanoslg.core.registry import QUANTIZATION
from nanoslg.model.quant.base import QuantMethod, add_param, check_ignored, replace_param, use_kernels

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # packed nibble i holds output column AWQ_ORDER[i] of its group of 8
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # output column j sits in nibble AWQ_REVERSE[j]
DEFAULT = {"bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}  # random weights' format


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n] -> [..., n, 8] its eight 4-bit values, lowest bits first."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return (packed.unsqueeze(-1) >> shifts) & 0xF


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ-packed int32 [rows, cols / 8] -> uint8 [rows, cols] in column order."""
    rows = packed.shape[0]
    order = torch.tensor(AWQ_REVERSE, device=packed.device)
    return _nibbles(packed).index_select(-1, order).reshape(rows, -1).to(torch.uint8)


def pack_k(q: torch.Tensor) -> torch.Tensor:
    """uint8 [in, out] 4-bit values -> int32 [in / 8, out], input row 8i + j in bits 4j of row i."""
    k, n = q.shape
    parts = q.to(torch.int32).reshape(k // 8, 8, n)
    out = torch.zeros(k // 8, n, dtype=torch.int32, device=q.device)
    for j in range(8):
        out |= parts[:, j] << (4 * j)
    return out


def dequantize(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """The repacked layout -> float32 weight [in, out]: (q - zero) * scale."""
    q = _nibbles(qweight).permute(0, 2, 1).reshape(-1, qweight.shape[1])  # nibble j of row i: input row 8i + j
    z = zeros.repeat_interleave(group, dim=0)
    s = scales.float().repeat_interleave(group, dim=0)
    return (q.to(torch.int32) - z.to(torch.int32)).float() * s


def awq_linear_torch(x: torch.Tensor, qweight, zeros, scales, group: int) -> torch.Tensor:
    """The reference: dequantize in float32, multiply in x's dtype."""
    return x @ dequantize(qweight, zeros, scales, group).to(x.dtype)


def load_awq(layer: nn.Module, param: nn.Parameter, loaded, shard_id) -> None:
    group = layer.quant.group_size
    if layer.in_features % group:
        raise ConfigError(
            f"the layer has {layer.in_features} input features (this rank's), not a multiple of "
            f"quantization_config.group_size={group}"
        )
    layer.load_sliced(param, loaded, shard_id)


def _on_kernels(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether x goes through the GPU kernels (a half-precision x on a layer that chose them)."""
    return layer.awq_kernel != "torch" and x.dtype in (torch.float16, torch.bfloat16)


@QUANTIZATION.register("awq")
class AwqMethod(QuantMethod):
    name = "awq"

    def __init__(self, group_size: int):
        super().__init__()
        self.group_size = group_size

    @classmethod
    def from_config(cls, qcfg: dict | None, load_format: str) -> AwqMethod:
        if qcfg is None:
            if load_format != "dummy":
                raise ConfigError(
                    "model.quantization=awq needs an AWQ checkpoint (config.json quantization_config with "
                    "quant_method awq); this one has none. model.load_format=dummy draws random AWQ weights "
                    "of its shapes"
                )
            qcfg = DEFAULT
        bits = qcfg.get("bits", qcfg.get("w_bit", 4))
        group = qcfg.get("group_size", qcfg.get("q_group_size", 128))
        version = str(qcfg.get("version", "gemm")).lower()
        zero = qcfg.get("zero_point", True)
        group_ok = isinstance(group, int) and group > 0 and group % 16 == 0
        for key, value, ok, allowed in (
            ("bits", bits, bits == 4, "4"),
            ("group_size", group, group_ok, "a positive multiple of 16"),
            ("zero_point", zero, zero is True, "true"),
            ("version", version, version == "gemm", "gemm"),
        ):
            if not ok:
                raise ConfigError(
                    f"config.json quantization_config.{key}={value!r} is not supported; allowed: {allowed}"
                )
        check_ignored("awq", "modules_to_not_convert", qcfg.get("modules_to_not_convert"))
        return cls(group)

    def settings(self) -> str:
        return f"awq (4-bit, group {self.group_size}, zero points)"

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        g, i32 = self.group_size, torch.int32
        groups, packed = -(-in_features // g), -(-out_features // 8)
        for name, shape, dtype, pack, unit in (
            ("qweight", (in_features, packed), i32, 8, 1),
            ("qzeros", (groups, packed), i32, 8, g),
            ("scales", (groups, out_features), torch.float16, 1, g),
        ):
            data = torch.empty(shape, dtype=dtype)
            p = add_param(layer, name, data, output_dim=1, input_dim=0, output_pack=pack, input_unit=unit)
            p.quant_loader = load_awq
            if dtype == i32:
                p.checkpoint_dtype = i32

    def process(self, layer: nn.Module) -> None:
        replace_param(layer, "qweight", pack_k(unpack_awq(layer.qweight.data)))
        layer.register_buffer("zeros", unpack_awq(layer.qzeros.data))
        delattr(layer, "qzeros")
        layer.awq_kernel = "triton" if use_kernels(layer.qweight) else "torch"
        if layer.awq_kernel == "triton":
            from nanoslg.model.quant.kernels import awq as gpu  # deferred: imports Triton

            # The GEMV's K splits count themselves done here; the layer's own, so no two linears share.
            layer.register_buffer("split_counts", gpu.split_counts(layer.qweight.shape[1], layer.qweight.device), False)
        self.kernels[KERNEL_NAMES[layer.awq_kernel]] += 1

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not _on_kernels(layer, x):
            return awq_linear_torch(x, layer.qweight, layer.zeros, layer.scales, self.group_size)
        return self._kernel(layer, x)

    def apply_silu_mul(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
        # One row (batch-1 decode): the GEMV computes the activation as it loads its input, which
        # saves the activation's own launch, a one-block kernel at one row.
        return self._kernel(layer, h, silu_mul=True) if h.shape[0] == 1 and _on_kernels(layer, h) else None

    def _kernel(self, layer: nn.Module, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        from nanoslg.model.quant.kernels import awq as gpu  # deferred: imports Triton

        qw, z, s, g = layer.qweight, layer.zeros, layer.scales, self.group_size
        return gpu.awq_linear(x, qw, z, s, g, counts=layer.split_counts, silu_mul=silu_mul)

    def linear_bytes(self, out_features: int, in_features: int, elem: int) -> int:
        groups = in_features // self.group_size
        return out_features * in_features // 2 + groups * out_features * 3  # int4; fp16 scale + byte zero

    def dummy_tensors(self, shape: tuple[int, int], device, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Random bits for the 4-bit values and zero points; scales that make the weights' spread
        about that of the float dummy weights (0.02), so activations stay finite through the layers."""
        out, inp = shape
        g = self.group_size

        def bits(*s):
            return torch.randint(-(2**31), 2**31, s, dtype=torch.int32, device=device, generator=gen)

        scales = torch.empty(-(-inp // g), out, device=device).uniform_(0.002, 0.004, generator=gen)
        return {
            "qweight": bits(inp, -(-out // 8)),
            "qzeros": bits(-(-inp // g), -(-out // 8)),
            "scales": scales.to(torch.float16),
        }


KERNEL_NAMES = {
    "triton": "Triton int4 GEMV (1 row) / GEMM (< 256 rows), dequantize + cuBLAS (more rows)",
    "torch": "plain-torch reference (dequantize)",
}
