"""KV accounting without pages or sharing: each sequence reserves whole pages' worth of tokens."""

from __future__ import annotations

from nanoslg.cache.kv_manager import KVManager
from nanoslg.core.sequence import Sequence


class TokenBudgetManager(KVManager):
    def __init__(self, num_pages: int, page_size: int):
        super().__init__(num_pages, page_size, prefix_caching=False)
        self.used_pages = 0

    def num_free_pages(self) -> int:
        return self.num_pages - self.used_pages

    def has_room(self, seq: Sequence, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) <= self.pages_for(seq.kv_tokens)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        if num_tokens <= seq.kv_tokens:
            return
        self.used_pages += self.pages_needed(seq, num_tokens)
        seq.kv_tokens = num_tokens

    def release(self, seq: Sequence, finished: bool) -> None:
        self.used_pages -= self.pages_for(seq.kv_tokens)
        seq.kv_tokens = 0
