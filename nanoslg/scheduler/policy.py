"""Admission policies: the order in which waiting sequences are admitted."""

from __future__ import annotations

from nanoslg.cache.kv_manager import KVManager
from nanoslg.core.config import SchedulerConfig
from nanoslg.core.registry import SCHEDULERS
from nanoslg.core.sequence import Sequence


class Policy:
    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg

    def order(self, waiting: list[Sequence], kv: KVManager) -> list[Sequence]:
        raise NotImplementedError


@SCHEDULERS.register("fcfs")
class FCFSPolicy(Policy):
    """First come, first served: arrival order (the waiting list is kept in that order)."""

    def order(self, waiting: list[Sequence], kv: KVManager) -> list[Sequence]:
        return waiting
