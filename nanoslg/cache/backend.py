"""The backend seam: `CacheBackend` (every rank, torch) owns the KV tensors of its shard and builds,
per step, the `CacheContext` the model's attention layers call. Its rank-0 twin, the `KVManager`
that `make_manager` returns, does the accounting (kv_manager.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from nanoslg.cache.kv_manager import KVManager
from nanoslg.cache.paged import PagedKVManager
from nanoslg.cache.token_budget import TokenBudgetManager
from nanoslg.core.plan import StepPlan
from nanoslg.core.tensors import to_device


@dataclass
class KVSpec:
    """The KV shape this rank holds."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    num_qo_heads: int = 0  # query heads on this rank (kernels that plan ahead need it)
    kv_dtype: torch.dtype | None = None  # the pool's dtype where it is not the model's (FP8: kv_quant.py)
    kv_scales: list[tuple[float, float]] | None = None  # per layer, (k, v) scales of an FP8 pool
    max_model_len: int = 0  # the longest sequence (0: not known), for kernels that size page tables by it

    @property
    def cache_dtype(self) -> torch.dtype:
        """What the pool holds."""
        return self.kv_dtype or self.dtype

    def scales(self, layer: int) -> tuple[float, float]:
        return self.kv_scales[layer] if self.kv_scales else (1.0, 1.0)

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.cache_dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


class CacheContext(ABC):
    """What attention layers see for one step. q: [T, Hq, D]; k, v: [T, Hkv, D]; returns [T, Hq, D]."""

    positions: torch.Tensor  # [T] position of every new token

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def attend_rotary(self, layer: int, q, k, v, positions: torch.Tensor, rotary) -> torch.Tensor:
        """rotary(positions, q, k), then attend. rotary has `cos_sin_cache` ([max_pos, D] float32, cos
        half | sin half, neox style), for a backend that applies it as it stores k (one kernel)."""
        q, k = rotary(positions, q, k)
        return self.attend(layer, q, k, v)


class CacheBackend(ABC):
    name: str = "base"
    paged: bool = False  # needs block tables from a paged KVManager
    cascade: bool = False  # paged backends: cascade attention over a prefix a decode step shares
    cascade_steps: int = 0  # decode steps that ran it (reported by the benchmarks)

    def __init__(self, spec: KVSpec, page_size: int):
        self.spec = spec
        self.page_size = page_size
        self.scale = spec.head_dim**-0.5  # softmax scale of every attention kernel

    def configure(self, cache_cfg) -> str:
        """Takes the backend's own cache.* options (a CacheConfig); returns what it chose, for the log."""
        return ""

    @abstractmethod
    def allocate(self, num_pages: int) -> None:
        """Reserve the pool (or just remember the budget, for backends that allocate lazily)."""

    @abstractmethod
    def prepare(self, plan: StepPlan) -> CacheContext:
        """Free what the plan says is done, run page copies, and build the step's context."""

    # -- CUDA-graph hooks: a backend whose decode steps can be captured sets supports_graphs ----
    supports_graphs: bool = False

    def init_graphs(self, max_bs: int, max_model_len: int) -> None:
        """Allocates the fixed buffers graphs of up to max_bs sequences read."""
        raise NotImplementedError(f"the {self.name} backend has no CUDA-graph hooks")

    def graph_variants(self, bs: int) -> tuple[str, ...]:
        """The graphs to capture for bucket bs (one per attention variant)."""
        return ("plain",)

    def capture_context(self, bs: int, variant: str) -> CacheContext:
        """A context over the fixed buffers, for capturing a decode step of bs padding rows."""
        raise NotImplementedError

    def prepare_replay(self, bs: int, plan: StepPlan) -> str:
        """Writes the decode step into bucket bs's buffers; returns the variant to replay."""
        raise NotImplementedError

    @classmethod
    def make_manager(cls, num_pages: int, page_size: int, prefix_caching: bool) -> KVManager:
        """The rank-0 KV manager that matches this backend: pages and a prefix tree for a paged
        backend, a plain token budget otherwise."""
        if cls.paged:
            return PagedKVManager(num_pages, page_size, prefix_caching)
        return TokenBudgetManager(num_pages, page_size)


def positions_of(plan: StepPlan, device: torch.device) -> torch.Tensor:
    pos = [p for s in plan.seqs for p in range(s.start, s.start + len(s.token_ids))]
    return to_device(pos, torch.long, device)
