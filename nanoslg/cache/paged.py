"""Paged KV accounting with radix prefix caching (rank 0, pure Python).

A sequence's `block_table` lists its pages; page i holds positions [i*ps, (i+1)*ps). With prefix
caching on:
- admission (`match_prefix`) reuses the longest cached prefix, capped one token short of the
  sequence so the last token is computed (its logits are sampled). If the match ends inside a
  cached page, that page is copied into a fresh one first (copy-on-write, run by the backend from
  `pop_copies()` before the step writes into it).
- full pages whose KV is computed go into the tree as the sequence runs (at each `grow`), so
  requests admitted later, even while it still runs, share them; `release` inserts the rest.
  Where the tree already held the same tokens, the sequence switches to the tree's page and frees
  its duplicate.
- each sequence locks the deepest tree node it uses, so its pages are never evicted under it;
  `grow` evicts least-recently-used unlocked cache when the free list runs short.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

from nanoslg.cache.allocator import PageAllocator, PageError
from nanoslg.cache.kv_manager import KVManager
from nanoslg.cache.radix import Node, RadixTree
from nanoslg.core.sequence import Sequence


@dataclass
class _SeqState:
    node: Node | None = None  # the locked tree node (None: nothing locked)
    depth: int = 0  # tokens on the path from the root to the end of `node` (fixed while it is locked)
    cached: int = 0  # leading block-table pages already known to be in the tree
    lookup: tuple[int, int] | None = None  # (prompt tokens, matched) not yet counted in the stats


class PagedKVManager(KVManager):
    paged = True

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        super().__init__(num_pages, page_size, prefix_caching)
        self.allocator = PageAllocator(num_pages)
        self.tree: RadixTree | None = RadixTree(page_size, self.allocator) if prefix_caching else None
        self._states: dict[int, _SeqState] = {}
        self._copies: list[tuple[int, int]] = []

    # -- sizes -----------------------------------------------------------------------------------
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    def num_evictable_pages(self) -> int:
        return self.tree.evictable_pages if self.tree is not None else 0

    def usage(self) -> float:
        """Share of pages held by running sequences (cache no one uses counts as free, as in vLLM)."""
        return 1.0 - self.num_available_pages() / max(self.num_pages, 1)

    def num_available_pages(self) -> int:
        return self.allocator.num_free + self.num_evictable_pages()

    def pages_held(self, seq: Sequence) -> int:
        return len(seq.block_table)

    def _state(self, seq: Sequence) -> _SeqState:
        st = self._states.get(seq.seq_id)
        if st is None:
            st = self._states[seq.seq_id] = _SeqState()
        return st

    def _ensure_free(self, n: int) -> bool:
        short = n - self.allocator.num_free
        if short > 0 and self.tree is not None:
            self.tree.evict(short)
        return self.allocator.num_free >= n

    # -- prefix lookup ---------------------------------------------------------------------------
    def peek_prefix(self, token_ids: Seq[int]) -> int:
        """Cached prefix length of `token_ids`, locking nothing and touching no LRU time (policies)."""
        if self.tree is None or not token_ids:
            return 0
        return self.tree.match_prefix(token_ids, touch=False)[0]

    def match_prefix(self, seq: Sequence) -> int:
        if self.tree is None or seq.block_table:
            return seq.num_computed_tokens
        st = self._state(seq)
        tokens = seq.token_ids  # after a preemption this includes the outputs: they are reusable too
        n, pages, node = self.tree.match_prefix(tokens[: len(tokens) - 1])
        full = n // self.page_size
        if n:
            self.tree.lock(node)
            st.node, st.depth = node, len(pages) * self.page_size
            table = pages[:full]
            self.allocator.incref_many(table)
            if n % self.page_size:  # the sequence will write into this page: give it its own copy
                if self._ensure_free(1):
                    dst = self.allocator.alloc(1)[0]
                    self._copies.append((pages[full], dst))
                    table.append(dst)
                else:
                    n = full * self.page_size
            seq.block_table = table
            seq.kv_tokens = n
        st.cached = full
        st.lookup = (seq.num_prompt_tokens, min(n, seq.num_prompt_tokens))
        return n

    def next_page_key(self, seq: Sequence):
        if self.tree is None:
            return None
        end = seq.num_computed_tokens // self.page_size * self.page_size + self.page_size
        # A hash, not the tuple: a prompt-long tuple per admission is garbage the collector would
        # walk element by element if a collection came during the step (a few ms per burst).
        return hash(tuple(seq.token_ids[:end])) if end <= len(seq.token_ids) else None

    # -- growth ----------------------------------------------------------------------------------
    def has_room(self, seq: Sequence, num_tokens: int) -> bool:
        """No new page needed, and (prefix caching) no computed full page still waiting to be cached:
        a prompt's pages must reach the tree as soon as they are computed, not when decoding next
        crosses a page boundary."""
        if num_tokens > len(seq.block_table) * self.page_size:
            return False
        if self.tree is None:
            return True
        st = self._states.get(seq.seq_id)
        return st is not None and self._full_computed_pages(seq) <= st.cached

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        st = self._state(seq)
        if st.lookup is not None:
            if not seq.admitted:  # count a request once, at its first admission
                self.prefix_queries += st.lookup[0]
                self.prefix_hits += st.lookup[1]
            st.lookup = None
        if self.tree is not None:
            self._cache_computed(seq, st)
        need = self.pages_needed(seq, num_tokens)
        if need > 0:
            if not self._ensure_free(need):
                raise PageError(
                    f"grow to {num_tokens} tokens needs {need} pages, {self.allocator.num_free} "
                    "free after eviction (the scheduler must check can_grow first)"
                )
            seq.block_table.extend(self.allocator.alloc(need))
        seq.kv_tokens = max(seq.kv_tokens, num_tokens)

    def _full_computed_pages(self, seq: Sequence) -> int:
        # Tokens being sampled in flight (lookahead) are computed but not yet known here.
        return min(min(seq.num_computed_tokens, len(seq.token_ids)) // self.page_size, len(seq.block_table))

    def _cache_computed(self, seq: Sequence, st: _SeqState) -> None:
        """Inserts the sequence's full, computed pages into the tree and locks the new path."""
        k = self._full_computed_pages(seq)
        if k <= st.cached:
            return
        ps = self.page_size
        base = st.cached if st.node is not None and st.depth == st.cached * ps else 0
        _, tree_pages, node = self.tree.insert(
            seq.token_ids[base * ps : k * ps], seq.block_table[base:k], start=st.node if base else None
        )
        table = seq.block_table
        for i, p in enumerate(tree_pages, base):
            if table[i] != p:  # the tree had these tokens already: share its page, drop ours
                self.allocator.incref(p)
                self.allocator.decref(table[i])
                table[i] = p
        if st.node is not None:
            self.tree.relock(st.node, node)
        else:
            self.tree.lock(node)
        st.node, st.depth = node, k * ps
        st.cached = k

    def shrink(self, seq: Sequence, num_tokens: int) -> None:
        # Pages past the valid tokens were never cached (the tree takes only full computed pages).
        keep = self.pages_for(num_tokens)
        for p in seq.block_table[keep:]:
            self.allocator.decref(p)
        del seq.block_table[keep:]
        seq.kv_tokens = min(seq.kv_tokens, num_tokens)

    # -- release ---------------------------------------------------------------------------------
    def release(self, seq: Sequence, finished: bool) -> None:
        # Finished, preempted and aborted sequences alike leave their computed pages in the cache:
        # a preempted one finds its own prefix again when it is re-admitted.
        st = self._states.pop(seq.seq_id, None) or _SeqState()
        if self.tree is not None and seq.block_table:
            self._cache_computed(seq, st)
        if self._copies:  # an admission undone before its step: its copy must not run
            mine = set(seq.block_table)
            self._copies = [c for c in self._copies if c[1] not in mine]
        for p in seq.block_table:
            self.allocator.decref(p)
        if st.node is not None:
            self.tree.unlock(st.node)
        seq.block_table = []
        seq.kv_tokens = 0

    def pop_copies(self) -> list[tuple[int, int]]:
        copies, self._copies = self._copies, []
        return copies

    def flush(self) -> None:
        if self.tree is not None:
            self.tree.evict_all()

    def check(self) -> None:
        """Allocator and tree consistency (tests)."""
        self.allocator.check()
        if self.tree is not None:
            self.tree.check()
            for sid, st in self._states.items():
                if st.node is not None and self.tree.depth(st.node) != st.depth:
                    raise PageError(
                        f"sequence {sid}: its locked node ends at token {self.tree.depth(st.node)}, not {st.depth}"
                    )
