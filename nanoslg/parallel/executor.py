"""The one protocol every parallel strategy's executor follows; the engine drives nothing else.

Two ways to run a step: `execute(plan)` (blocking, up to `max_inflight` at once from engine
threads: pipeline stages each hold a micro-batch), or, where `overlap` is true, `launch(plan)` then
`collect(handle)`, so the host can queue step N+1 before step N's tokens are read; a plan launched
with `sample_later` (grammar masks that wait for step N's tokens) is finished by `sample(handle, masks)`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from nanoslg.cache.backend import CacheBackend
from nanoslg.core.plan import StepPlan, StepResult, TokenMasks
from nanoslg.runtime.build import RankRuntime


class Executor(Protocol):
    overlap: bool  # launch/collect may run with two steps in flight (one GPU)
    max_inflight: int  # steps the engine may have in execute() at once
    device: torch.device  # rank 0's device
    rt: RankRuntime  # rank 0's runtime (this process's model, backend and sampler)
    num_pages: int  # KV pages the scheduler may hand out (the smallest rank's pool)
    budget_why: str  # how the KV budget was decided, for the start-up log

    @property
    def backend(self) -> CacheBackend: ...

    def launch(self, plan: StepPlan) -> Any: ...

    def sample(self, handle: Any, masks: TokenMasks | None) -> Any: ...

    def collect(self, handle: Any) -> StepResult: ...

    def execute(self, plan: StepPlan) -> StepResult: ...

    def check_alive(self) -> None:
        """Raises EngineDeadError when a rank is gone (called while the engine idles)."""

    def shutdown(self) -> None: ...
