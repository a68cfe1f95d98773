"""Process-group state the model layers read. Defaults describe one process (no parallelism)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: object | None = None  # torch.distributed ProcessGroup of this rank's TP group
    stage_layers: tuple[int, int] = (0, -1)  # [first, last) layer this PP stage runs; -1: to the end

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


_state = ParallelState()


def get_state() -> ParallelState:
    return _state


def set_state(state: ParallelState) -> None:
    global _state
    _state = state


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.tp_size > 1:
        dist.all_reduce(x, group=_state.tp_group)
    return x


def tp_all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise max over the TP group, in place (a process without a group keeps its own)."""
    if _state.tp_size > 1 and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=_state.tp_group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenates each TP rank's slice along the last dim (rank order)."""
    if _state.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_state.tp_group)
    return torch.cat(parts, dim=-1)
