"""Radix tree of cached KV pages, keyed by token ids (SGLang's RadixCache at page granularity).

Choices, so every reader can rely on them:
- The tree stores **full pages only**: a node's key is a whole number of pages of token ids and it
  holds exactly one page per `page_size` tokens. A cached page is never written again.
- A lookup may still end **inside a page**: `match_prefix` returns how many tokens matched, and when
  that count is not page-aligned the last returned page is only partly valid for the caller. The
  paged manager copies such a page before the sequence writes into it (copy-on-write).
- The tree holds one allocator reference per page it stores; `evict` drops it. A sequence that uses
  cached pages `lock`s the deepest node it uses, which pins the whole path up to the root.
- Eviction is LRU over unlocked leaves, and trims a leaf from its tail, a page at a time, so a long
  leaf gives up only what is needed.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from collections.abc import Sequence as Seq

from nanoslg.cache.allocator import PageAllocator, PageError


class Node:
    __slots__ = ("key", "pages", "children", "by_first", "parent", "lock_ref", "last_access", "hits")

    def __init__(self, key: tuple, pages: list[int], parent: Node | None):
        self.key = key  # token ids, len(key) == len(pages) * page_size
        self.pages = pages
        self.children: dict[tuple, Node] = {}  # first page's token ids -> child
        self.by_first: dict[int, list[tuple]] = {}  # first token -> children keys (partial-page lookups)
        self.parent = parent
        self.lock_ref = 0  # running sequences whose prefix goes through this node
        self.last_access = 0
        self.hits = 0  # admissions whose matched prefix went through this node

    def __repr__(self) -> str:
        return f"Node(pages={self.pages}, lock={self.lock_ref}, children={len(self.children)})"


def _common_len(a: Seq[int], b: Seq[int]) -> int:
    """Length of the common head of a and b. Keys are a thousand tokens long where a long prompt is
    cached, so the search halves the range with C-level slice compares instead of a Python loop."""
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; the first difference, if any, is below hi
    if tuple(a[:hi]) == tuple(b[:hi]):
        return hi
    while hi - lo > 16:
        mid = (lo + hi) // 2
        if tuple(a[lo:mid]) == tuple(b[lo:mid]):
            lo = mid
        else:
            hi = mid
    while a[lo] == b[lo]:
        lo += 1
    return lo


class RadixTree:
    def __init__(self, page_size: int, allocator: PageAllocator):
        self.page_size = page_size
        self.allocator = allocator
        self.root = Node((), [], None)
        self.root.lock_ref = 1  # never evicted
        self.num_cached_pages = 0  # pages the tree holds
        self.evictable_pages = 0  # of those, pages in unlocked nodes (each of them freed by eviction)
        self.evicted_pages = 0  # pages evicted so far (a counter for metrics and tests)
        self._clock = itertools.count(1)
        self._heap: list = []  # lazy LRU heap of (last_access, tiebreak, node); stale entries skipped
        self._tiebreak = itertools.count()
        self._num_nodes = 1

    # -- structure helpers ---------------------------------------------------------------------
    def _add_child(self, parent: Node, child: Node) -> None:
        first = child.key[: self.page_size]
        parent.children[first] = child
        parent.by_first.setdefault(first[0], []).append(first)
        child.parent = parent

    def _remove_child(self, parent: Node, child: Node) -> None:
        first = child.key[: self.page_size]
        del parent.children[first]
        lst = parent.by_first[first[0]]
        lst.remove(first)
        if not lst:
            del parent.by_first[first[0]]

    def _push(self, node: Node) -> None:
        if not node.children and node is not self.root:
            heapq.heappush(self._heap, (node.last_access, next(self._tiebreak), node))
            if len(self._heap) > 4 * self._num_nodes + 64:
                self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self._heap = [(n.last_access, next(self._tiebreak), n) for n in self.nodes() if not n.children]
        heapq.heapify(self._heap)

    def _touch(self, node: Node, now: int) -> None:
        node.last_access = now
        self._push(node)

    def _split(self, node: Node, num_pages: int) -> Node:
        """Cuts `node` after `num_pages` pages; returns the new upper part (node keeps the rest)."""
        ps = self.page_size
        parent = node.parent
        upper = Node(node.key[: num_pages * ps], node.pages[:num_pages], parent)
        upper.lock_ref, upper.last_access, upper.hits = node.lock_ref, node.last_access, node.hits
        self._remove_child(parent, node)
        node.key, node.pages = node.key[num_pages * ps :], node.pages[num_pages:]
        self._add_child(parent, upper)
        self._add_child(upper, node)
        self._num_nodes += 1
        return upper

    def _partial_child(self, node: Node, rest: Seq[int]) -> tuple[Node | None, int]:
        """The child whose first page shares the longest (non-empty) head with `rest`."""
        best, best_len = None, 0
        for first in node.by_first.get(rest[0], ()) if rest else ():
            n = _common_len(first, rest[: self.page_size])
            if n > best_len:
                best, best_len = node.children[first], n
        return best, best_len

    # -- lookups -------------------------------------------------------------------------------
    def match_prefix(self, token_ids: Seq[int], touch: bool = True) -> tuple[int, list[int], Node]:
        """Longest cached prefix of `token_ids`: (tokens matched, the pages holding them, last node).

        The token count may end inside the last page. With touch (an admission), the path's LRU times
        and hit counters are updated and a node the match ends inside is split at the page boundary
        after the match, so `last_node` covers exactly the returned pages. touch=False only reads.
        """
        ps = self.page_size
        node, n, pages = self.root, 0, []
        now = next(self._clock) if touch else 0
        path = []
        while True:
            rest = token_ids[n:]
            child = node.children.get(tuple(rest[:ps])) if len(rest) >= ps else None
            if child is None:  # at most a partial first page matches under this node
                child, k = self._partial_child(node, rest)
                if child is None:
                    break
                if touch and len(child.pages) > 1:
                    child = self._split(child, 1)
                pages.append(child.pages[0])
                n += k
                node = child
                path.append(node)
                break
            k = _common_len(child.key, rest)
            if k == len(child.key):  # the whole node matches: go on below it
                pages.extend(child.pages)
                n += k
                node = child
                path.append(node)
                continue
            used = -(-k // ps)  # pages touched, the last possibly in part
            if touch and used < len(child.pages):
                child = self._split(child, used)
            pages.extend(child.pages[:used])
            n += k
            node = child
            path.append(node)
            break
        if touch:
            for nd in path:
                nd.hits += 1
                self._touch(nd, now)
        return n, pages, node

    # -- insertion -----------------------------------------------------------------------------
    def insert(self, token_ids: Seq[int], pages: Seq[int], start: Node | None = None) -> tuple[int, list[int], Node]:
        """Caches the full pages of `token_ids` (page i holds tokens [i*ps, (i+1)*ps)).

        Returns (tokens that were already cached, the tree's pages for the inserted prefix, last node).
        Where the tree already held a prefix, its own pages are returned (the caller's duplicates are
        not taken); new pages gain one reference, owned by the tree. With `start`, the tokens and
        pages continue the path that ends at that node (a running sequence's locked node), so a
        growing sequence inserts only its new pages instead of walking from the root.
        """
        ps = self.page_size
        num = min(len(token_ids) // ps, len(pages))
        tokens = tuple(token_ids[: num * ps])
        now = next(self._clock)
        node, i, out = start or self.root, 0, []
        existing = 0
        while i < len(tokens):
            child = node.children.get(tokens[i : i + ps])
            if child is None:
                new_pages = list(pages[i // ps : num])
                for p in new_pages:
                    self.allocator.incref(p)
                new = Node(tokens[i:], new_pages, node)
                self._add_child(node, new)
                self._num_nodes += 1
                self.num_cached_pages += len(new_pages)
                self.evictable_pages += len(new_pages)
                out.extend(new_pages)
                node = new
                self._touch(node, now)
                break
            k = _common_len(child.key, tokens[i:]) // ps  # whole pages shared
            if k < len(child.pages):
                child = self._split(child, k)
            out.extend(child.pages)
            i += k * ps
            existing = i
            node = child
            self._touch(node, now)
        return existing, out, node

    def depth(self, node: Node) -> int:
        """Tokens on the path from the root to the end of `node`."""
        n = 0
        while node is not None:
            n += len(node.key)
            node = node.parent
        return n

    # -- locking -------------------------------------------------------------------------------
    def lock(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_pages -= len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def relock(self, old: Node, new: Node) -> None:
        """lock(new) then unlock(old); when `old` is on new's path (a sequence that grew), only the
        nodes below it change, so the walk stops there."""
        node = new
        while node is not old and node is not self.root:
            node = node.parent
        if node is not old:
            self.lock(new)
            self.unlock(old)
            return
        node = new
        while node is not old:
            if node.lock_ref == 0:
                self.evictable_pages -= len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        start = node
        while node is not self.root:
            if node.lock_ref <= 0:
                raise PageError(f"unlock of an unlocked radix node {node}")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_pages += len(node.pages)
            node = node.parent
        if start.lock_ref == 0:
            self._push(start)

    # -- eviction ------------------------------------------------------------------------------
    def evict(self, num_pages: int) -> int:
        """Frees up to `num_pages` pages, least recently used unlocked leaves first (tail pages first)."""
        freed = 0
        while freed < num_pages and self._heap:
            t, _, node = heapq.heappop(self._heap)
            if node.parent is None or node.children or node.lock_ref > 0 or t != node.last_access:
                continue  # stale entry: gone, inner, locked or touched since
            take = min(num_pages - freed, len(node.pages))
            for p in node.pages[len(node.pages) - take :]:
                self.allocator.decref(p)
            freed += take
            self.evicted_pages += take
            self.num_cached_pages -= take
            self.evictable_pages -= take
            if take < len(node.pages):  # trim the tail; the rest stays cached
                node.key = node.key[: (len(node.pages) - take) * self.page_size]
                node.pages = node.pages[: len(node.pages) - take]
                self._push(node)
                continue
            parent = node.parent
            self._remove_child(parent, node)
            node.parent = None
            self._num_nodes -= 1
            if not parent.children and parent.lock_ref == 0:
                self._push(parent)
        return freed

    def evict_all(self) -> int:
        return self.evict(self.evictable_pages)

    # -- views for schedulers, metrics and tests -----------------------------------------------
    def nodes(self) -> Iterator[Node]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def subtree_weights(self, counts: dict[Node, int]) -> dict[Node, int]:
        """Each node's count plus its whole subtree's (DFS-weight scheduling)."""
        order = list(self.nodes())  # parents before children
        weight = {n: counts.get(n, 0) for n in order}
        for node in reversed(order):
            if node.parent is not None:
                weight[node.parent] += weight[node]
        return weight

    def check(self) -> None:
        """Internal consistency (tests): keys, page counts, counters, locks, allocator references."""
        ps, cached, evictable, count = self.page_size, 0, 0, 0
        for node in self.nodes():
            count += 1
            if node is not self.root:
                if len(node.key) != len(node.pages) * ps or not node.pages:
                    raise PageError(f"{node}: key of {len(node.key)} tokens for {len(node.pages)} pages")
                if node.parent.children.get(node.key[:ps]) is not node:
                    raise PageError(f"{node}: not indexed under its parent")
                cached += len(node.pages)
                evictable += len(node.pages) if node.lock_ref == 0 else 0
                for p in node.pages:
                    if self.allocator.refs[p] < 1:
                        raise PageError(f"{node}: page {p} is cached but free")
            if sum(c.lock_ref for c in node.children.values()) > node.lock_ref and node is not self.root:
                raise PageError(f"{node}: children hold more locks than the node")
            firsts = sorted(k for lst in node.by_first.values() for k in lst)
            if firsts != sorted(node.children):
                raise PageError(f"{node}: first-token index out of sync")
        if (cached, evictable, count) != (self.num_cached_pages, self.evictable_pages, self._num_nodes):
            raise PageError(
                f"counters (cached={self.num_cached_pages}, evictable={self.evictable_pages}, "
                f"nodes={self._num_nodes}) but found ({cached}, {evictable}, {count})"
            )
