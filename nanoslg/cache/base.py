"""The cache seams.

- `KVManager` (rank 0, pure Python): decides how much KV memory each sequence holds, which pages it
  owns and which prompt prefix is already cached. The scheduler talks to it.
- `CacheBackend` (every rank, torch): owns the KV tensors of its shard and builds, per step, the
  `CacheContext` the model's attention layers call.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from nanoslg.engine.sequence import Sequence
from nanoslg.scheduler.plan import StepPlan
from nanoslg.tensors import to_device


class KVManager(ABC):
    """Accounting of KV memory in pages of `page_size` tokens."""

    paged: bool = False  # True: sequences carry block tables the backend reads

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = False):
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found cached

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @abstractmethod
    def num_free_pages(self) -> int: ...

    def usage(self) -> float:
        return 1.0 - self.num_free_pages() / max(self.num_pages, 1)

    def match_prefix(self, seq: Sequence) -> int:
        """On admission: reuse cached pages of the prompt. Sets seq.num_computed_tokens; returns it."""
        return 0

    def next_page_key(self, seq: Sequence):
        """With prefix caching: a key for the tokens up to the end of the first page this sequence
        would compute next (two sequences computing the same page share it), else None. It only
        decides whether a sequence waits a step to hit the cache, so a hash of the tokens will do: a
        collision costs one step's wait, never a wrong token."""
        return None

    def has_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the sequence already holds KV for `num_tokens` tokens (no grow needed). A decode
        that stays inside its last page skips can_grow/grow: the scheduler's per-step fast path."""
        return False

    @abstractmethod
    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the sequence can hold `num_tokens` tokens of KV in total."""

    @abstractmethod
    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Reserve KV for `num_tokens` tokens in total (callers check can_grow first)."""

    @abstractmethod
    def release(self, seq: Sequence, finished: bool) -> None:
        """Give back the sequence's KV; a finished sequence's pages may stay in the prefix cache."""

    def pop_copies(self) -> list[tuple[int, int]]:
        """Page copies (copy-on-write) the backend must run before the next step."""
        return []

    def flush(self) -> None:
        """Drop every unreferenced cached prefix."""


@dataclass
class KVSpec:
    """The KV shape this rank holds."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    num_qo_heads: int = 0  # query heads on this rank (kernels that plan ahead need it)

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


class CacheContext(ABC):
    """What attention layers see for one step. q: [T, Hq, D]; k, v: [T, Hkv, D]; returns [T, Hq, D]."""

    positions: torch.Tensor  # [T] position of every new token

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class CacheBackend(ABC):
    name: str = "base"
    paged: bool = False  # needs block tables from a paged KVManager
    cascade: bool = False  # paged backends: cascade attention over a prefix a decode step shares
    cascade_steps: int = 0  # decode steps that ran it (reported by the benchmarks)

    def __init__(self, spec: KVSpec, page_size: int):
        self.spec = spec
        self.page_size = page_size

    @abstractmethod
    def allocate(self, num_pages: int) -> None:
        """Reserve the pool (or just remember the budget, for backends that allocate lazily)."""

    @abstractmethod
    def prepare(self, plan: StepPlan) -> CacheContext:
        """Free what the plan says is done, run page copies, and build the step's context."""

    @classmethod
    def make_manager(cls, num_pages: int, page_size: int, prefix_caching: bool) -> KVManager:
        """The rank-0 KV manager that matches this backend."""
        from nanoslg.cache.token_budget import TokenBudgetManager

        return TokenBudgetManager(num_pages, page_size)


def positions_of(plan: StepPlan, device: torch.device) -> torch.Tensor:
    pos = [p for s in plan.seqs for p in range(s.start, s.start + len(s.token_ids))]
    return to_device(pos, torch.long, device)
