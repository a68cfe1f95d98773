"""Ref-counted KV pages. Pure Python: the radix tree and the paged manager build on it, and CI tests it.

A page's owners each hold one reference: every sequence whose block table lists it, and the radix
tree while the page is cached there. The page returns to the free list when the last one lets go.
"""

from __future__ import annotations


class PageError(RuntimeError):
    """A page was freed twice, referenced while free, or the pool ran out: an accounting bug."""


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.refs = [0] * num_pages
        # Popped from the end: low page ids go first, which keeps small tests readable.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """n fresh pages, each with one reference (the caller's)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise PageError(f"out of KV pages: asked for {n}, {len(self._free)} free of {self.num_pages}")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self.refs[p] = 1
        return pages

    def incref(self, page: int) -> None:
        if self.refs[page] <= 0:
            raise PageError(f"page {page} is free; it cannot gain a reference")
        self.refs[page] += 1

    def incref_many(self, pages: list[int]) -> None:
        refs = self.refs
        if 0 in [refs[p] for p in pages]:
            free = next(p for p in pages if refs[p] <= 0)
            raise PageError(f"page {free} is free; it cannot gain a reference")
        for p in pages:
            refs[p] += 1

    def decref(self, page: int) -> bool:
        """Drops one reference; returns True when that freed the page."""
        if self.refs[page] <= 0:
            raise PageError(f"page {page} is already free (double free or one decref too many)")
        self.refs[page] -= 1
        if self.refs[page] == 0:
            self._free.append(page)
            return True
        return False

    def check(self) -> None:
        """Consistency of the free list with the counts (tests call it after every operation)."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise PageError("a page is on the free list twice")
        for p, r in enumerate(self.refs):
            if r < 0 or (r == 0) != (p in free):
                raise PageError(f"page {p}: refcount {r} but {'on' if p in free else 'off'} the free list")
