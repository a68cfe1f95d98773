"""The accounting seam: `KVManager` (rank 0, pure Python) decides how much KV memory each sequence
holds, which pages it owns and which prompt prefix is already cached. The scheduler talks to it;
it never writes a sequence's token counts (the scheduler owns those), only its KV fields
(`block_table`, `kv_tokens`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from nanoslg.core.sequence import Sequence


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

    def num_available_pages(self) -> int:
        """Pages a sequence could grow into now: free ones (and, with a prefix cache, evictable ones)."""
        return self.num_free_pages()

    def pages_held(self, seq: Sequence) -> int:
        """Pages the sequence holds now."""
        return self.pages_for(seq.kv_tokens)

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Pages the sequence must add to hold `num_tokens` tokens (negative if it holds more)."""
        return self.pages_for(num_tokens) - self.pages_held(seq)

    def match_prefix(self, seq: Sequence) -> int:
        """On admission: reuse cached pages of the prompt. Returns how many tokens are already computed
        (the scheduler sets seq.num_computed_tokens from it)."""
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

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the sequence can hold `num_tokens` tokens of KV in total."""
        return self.pages_needed(seq, num_tokens) <= self.num_available_pages()

    @abstractmethod
    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Reserve KV for `num_tokens` tokens in total (callers check can_grow first)."""

    @abstractmethod
    def release(self, seq: Sequence, finished: bool) -> None:
        """Give back the sequence's KV; a finished sequence's pages may stay in the prefix cache."""

    def shrink(self, seq: Sequence, num_tokens: int) -> None:  # noqa: B027 (a token budget keeps its reservation)
        """Speculative decoding: only the first `num_tokens` of the sequence's KV are valid (the rest held
        rejected proposals). A paged manager frees the pages past them; a token budget keeps its
        reservation, since the sdpa backend keeps a sequence's pages until it is freed."""

    def pop_copies(self) -> list[tuple[int, int]]:
        """Page copies (copy-on-write) the backend must run before the next step."""
        return []

    def flush(self) -> None:  # noqa: B027 (a manager without a prefix cache has nothing to drop)
        """Drop every unreferenced cached prefix."""
