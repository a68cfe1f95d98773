"""Building blocks: norms, activation, rotary embedding, and tensor-parallel linears.

TP linears follow nano-vllm: each parameter carries a `weight_loader(param, loaded, shard_id=None)`
that copies this rank's slice of a checkpoint tensor. `loaded` is a torch tensor or a safetensors
slice (`safe_open(...).get_slice(name)`), so only the slice is read from disk. With tp_size=1
everything is a plain linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanoslg.core.dist import get_state, tp_all_gather_last_dim, tp_all_reduce
from nanoslg.core.errors import ConfigError
from nanoslg.model import kernels


def _shape(loaded) -> list[int]:
    return list(loaded.get_shape()) if hasattr(loaded, "get_shape") else list(loaded.shape)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ConfigError(f"this rank's slice has shape {tuple(src.shape)}, the model expects {tuple(dst.shape)}")
    dst.copy_(src)


# -- norms and activation -----------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 like HF. With `residual`, adds it first and returns (normed, new residual)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            if x.dim() in (2, 3):  # 3-D: Qwen3's per-head q/k norm on strided views of qkv, read in place
                return kernels.rms_norm(x, self.weight, self.eps)
            shape = x.shape
            return kernels.rms_norm(x.reshape(-1, shape[-1]), self.weight, self.eps).view(shape)
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


# -- rotary embedding -----------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """HF's inverse frequencies, with the `linear` and `llama3` scalings."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        return torch.where(medium, smoothed, scaled)
    raise ConfigError(f"config.json rope_type={kind!r} is not supported; allowed: default, linear, llama3")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary (HF Llama/Qwen) with a [max_pos, head_dim] fp32 cos|sin cache."""

    def __init__(self, head_dim: int, max_pos: int, theta: float, scaling: dict | None):
        super().__init__()
        inv = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype=torch.float32)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return kernels.rope(positions, q, k, self.cos_sin_cache)


# -- tensor-parallel linears ------------------------------------------------------------------------------
def _read(loaded, dim: int | None, start: int = 0, size: int = 0) -> torch.Tensor:
    """[start, start+size) along `dim` of a tensor or safetensors slice; the whole of it when dim is None."""
    if dim is None:
        return loaded[...]
    return loaded[(slice(None),) * dim + (slice(start, start + size),)]


def _units(n: int, unit: int, what: str) -> int:
    if n % unit:
        raise ConfigError(f"{what} {n} is not a multiple of {unit}")
    return n // unit


class LinearBase(nn.Module):
    """Holds `weight` [out, in] (and `bias`), or what a quantization method (nanoslg/model/quant/)
    stores instead. One weight_loader slices every parameter by its attributes (output_dim,
    input_dim, output_pack, input_unit; see quant/base.py): a column-parallel layer takes its output
    rows of each shard, a row-parallel layer its input columns."""

    split = "none"  # "column" | "row": which features tensor parallelism splits

    def __init__(self, in_features: int, out_features: int, bias: bool, quant=None):
        super().__init__()
        st = get_state()
        self.tp_rank, self.tp_size = st.tp_rank, st.tp_size
        self.in_features, self.out_features = in_features, out_features
        self.quant = quant
        if quant is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
            self.weight.weight_loader = self.weight_loader
            self.weight.output_dim, self.weight.input_dim = 0, 1
        else:
            quant.create_weights(self, in_features, out_features)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            self.bias.weight_loader = self.weight_loader
            self.bias.output_dim, self.bias.input_dim = 0, None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T without the bias."""
        if self.quant is None:
            return F.linear(x, self.weight)
        return self.quant.apply(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return F.linear(x, self.weight, self.bias)
        y = self.quant.apply(self, x)
        return y if self.bias is None else y + self.bias

    def out_shard(self, shard_id) -> tuple[int, int, int, int]:
        """(offset in this rank's output, size, start in the checkpoint tensor, its full size), in output
        features, of the checkpoint tensor `shard_id` names."""
        raise NotImplementedError

    def in_shard(self) -> tuple[int, int, int]:
        """(start, size, full size) of this rank's input features."""
        raise NotImplementedError

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        own = getattr(param, "quant_loader", None)
        if own is not None:  # a method's own loader (quant/base.py), which may call load_sliced
            return own(self, param, loaded, shard_id)
        self.load_sliced(param, loaded, shard_id)

    def load_sliced(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """Copies this rank's slice of `loaded` into `param`, as its slicing attributes say."""
        dst, out_dim, in_dim = param.data, getattr(param, "output_dim", None), getattr(param, "input_dim", None)
        if self.split == "column" and out_dim is not None:
            pack = getattr(param, "output_pack", 1)
            what = "output features" + ("" if shard_id is None else f" of shard {shard_id!r}")
            off, size, start, full = (_units(v, pack, what) for v in self.out_shard(shard_id))
            _check_extent(loaded, out_dim, full)
            dst, src = dst.narrow(out_dim, off, size), _read(loaded, out_dim, start, size)
        elif self.split == "row" and in_dim is not None:
            unit = getattr(param, "input_unit", 1)
            what = "input features (this rank's, at group boundaries)"
            start, size, full = (_units(v, unit, what) for v in self.in_shard())
            _check_extent(loaded, in_dim, full)
            src = _read(loaded, in_dim, start, size)
        else:  # whole on every rank (a row-parallel bias, added once after the reduce)
            src = _read(loaded, None)
        want = getattr(param, "checkpoint_dtype", None)
        if want is not None and src.dtype != want:
            raise ConfigError(f"dtype {src.dtype} where {want} is expected")
        _copy(dst, src)


def _check_extent(loaded, dim: int, full: int) -> None:
    shape = _shape(loaded)
    if len(shape) <= dim or shape[dim] != full:
        raise ConfigError(f"shape {tuple(shape)} does not fit: dimension {dim} must be {full}")


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ConfigError(f"{what}={n} is not divisible by parallel.tp_size={tp}")
    return n // tp


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank returns its slice."""

    split = "column"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant=None):
        super().__init__(in_features, _divide(out_features, get_state().tp_size, "output features"), bias, quant)

    def out_shard(self, shard_id) -> tuple[int, int, int, int]:
        n = self.out_features
        return 0, n, self.tp_rank * n, n * self.tp_size


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_up); shard_id = index in `output_sizes`."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, quant=None):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, quant)

    def out_shard(self, shard_id: int) -> tuple[int, int, int, int]:
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        return offset, size, self.tp_rank * size, self.output_sizes[shard_id]


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections fused; shard ids "q", "k", "v". When tp_size > num_kv_heads each KV head is
    replicated on tp_size / num_kv_heads ranks."""

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False, quant=None):
        tp = get_state().tp_size
        if num_kv_heads % tp and tp % num_kv_heads:
            raise ConfigError(
                f"num_key_value_heads={num_kv_heads} and parallel.tp_size={tp}: one must divide the other"
            )
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp, "num_attention_heads")
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.total_kv_heads = num_kv_heads
        self.kv_replicas = max(1, tp // num_kv_heads)  # ranks sharing one KV head
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden, out, bias, quant)

    def out_shard(self, shard_id: str) -> tuple[int, int, int, int]:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            return 0, q, self.tp_rank * q, q * self.tp_size
        offset = q if shard_id == "k" else q + kv
        return offset, kv, (self.tp_rank // self.kv_replicas) * kv, self.total_kv_heads * self.head_dim


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    split = "row"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant=None):
        super().__init__(_divide(in_features, get_state().tp_size, "input features"), out_features, bias, quant)

    def in_shard(self) -> tuple[int, int, int]:
        n = self.in_features
        return self.tp_rank * n, n, n * self.tp_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.matmul(x))

    def forward_silu_mul(self, h: torch.Tensor) -> torch.Tensor:
        """forward(silu(gate) * up) for h = [gate | up] (this rank's shards of both): in one kernel
        where the quantization method has one, else the activation kernel and then forward."""
        y = None if self.quant is None else self.quant.apply_silu_mul(self, h)
        return self.forward(kernels.silu_and_mul(h)) if y is None else self.reduce(y)

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        """This rank's partial product summed over the ranks, plus the bias."""
        y = tp_all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Vocab rows split across ranks (vocab padded up to a multiple of tp_size)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        st = get_state()
        self.tp_rank, self.tp_size = st.tp_rank, st.tp_size
        self.vocab_size = vocab_size
        self.part = -(-vocab_size // self.tp_size)
        self.start = self.tp_rank * self.part
        self.weight = nn.Parameter(torch.empty(self.part, dim))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = max(0, min(self.part, self.vocab_size - self.start))
        if _shape(loaded)[0] != self.vocab_size:
            raise ConfigError(f"checkpoint vocab rows {_shape(loaded)[0]} != vocab_size={self.vocab_size}")
        param.data.zero_()
        if n:
            param.data[:n].copy_(_read(loaded, 0, self.start, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(x, self.weight)
        mask = (x >= self.start) & (x < self.start + self.part)
        y = F.embedding(torch.where(mask, x - self.start, 0), self.weight)
        return tp_all_reduce(y * mask.unsqueeze(-1).to(y.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H] -> logits [B, vocab] in the model's dtype, gathered from every TP rank, padding
        trimmed. The sampler upcasts what it needs: a greedy step's argmax reads them as they are
        (bf16 -> float32 is exact, so it picks the same token), which saves writing a float32 copy
        of the whole vocabulary every step."""
        logits = tp_all_gather_last_dim(F.linear(x, self.weight))
        return logits[:, : self.vocab_size]
