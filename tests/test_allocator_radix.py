"""Page allocator, radix tree and paged KV manager invariants (pure Python, CPU).

The property test drives PagedKVManager the way the scheduler does (admit with a prefix match,
grow, compute, finish, preempt, undo an admission, flush) and keeps a shadow of what every KV slot
holds: the identity of the prefix whose KV sits there. Reading a slot that holds another prefix's
KV, or writing into a page somebody else shares, fails the test; so do leaked or double-freed pages.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoslg.cache.allocator import PageAllocator, PageError
from nanoslg.cache.paged import PagedKVManager
from nanoslg.cache.radix import RadixTree, _common_len
from nanoslg.core.config import SchedulerConfig
from nanoslg.core.registry import SCHEDULERS
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.core.sequence import Sequence


def make_seq(tokens: list[int], t: float = 0.0) -> Sequence:
    return Sequence("r", list(tokens), SamplingParams(max_tokens=8), arrival_time=t)


# -- allocator ---------------------------------------------------------------------------------
def test_allocator_refcounts_and_errors():
    a = PageAllocator(4)
    pages = a.alloc(3)
    assert sorted(pages) == [0, 1, 2] and a.num_free == 1
    a.incref(pages[0])
    assert a.decref(pages[0]) is False and a.decref(pages[0]) is True
    with pytest.raises(PageError, match="already free"):
        a.decref(pages[0])
    with pytest.raises(PageError, match="is free"):
        a.incref(pages[0])
    with pytest.raises(PageError, match="out of KV pages"):
        a.alloc(3)
    for p in pages[1:]:
        a.decref(p)
    a.check()
    assert a.num_free == 4


# -- radix tree --------------------------------------------------------------------------------
def test_radix_match_insert_split_and_partial_page():
    a = PageAllocator(16)
    t = RadixTree(4, a)
    seq = list(range(12))
    pages = a.alloc(3)
    existing, tree_pages, node = t.insert(seq, pages)
    assert existing == 0 and tree_pages == pages and t.num_cached_pages == 3
    assert all(a.refs[p] == 2 for p in pages)  # the caller's reference and the tree's
    # Full-page prefix, mid-page prefix, divergence in the first page.
    assert t.match_prefix(seq[:8] + [99], touch=False)[:2] == (8, pages[:2])
    assert t.match_prefix(seq[:6] + [99], touch=False)[:2] == (6, pages[:2])
    assert t.match_prefix([0, 1, 77], touch=False)[:2] == (2, pages[:1])
    assert t.match_prefix([5], touch=False)[0] == 0
    # A touching match splits at the page boundary after the match: the node covers exactly its pages.
    n, got, last = t.match_prefix(seq[:6] + [99])
    assert (n, got, last.pages) == (6, pages[:2], pages[:2])
    t.check()
    # A second branch sharing one page: the shared page is the tree's, the duplicate is not taken.
    other = seq[:4] + [50, 51, 52, 53]
    p2 = a.alloc(2)
    existing, tree_pages, _ = t.insert(other, p2)
    assert existing == 4 and tree_pages == [pages[0], p2[1]] and a.refs[p2[0]] == 1
    t.check()
    for p in pages + p2:
        a.decref(p)
    assert t.evict_all() == 4 and a.num_free == 16 and t.num_cached_pages == 0
    t.check()


def test_radix_insert_from_a_node_equals_insert_from_the_root():
    """A growing sequence inserts only its new pages, from its locked node: same tree, same pages."""
    trees = []
    for incremental in (False, True):
        a = PageAllocator(32)
        t = RadixTree(2, a)
        t.insert([9, 9, 9, 9], a.alloc(2))  # a branch that shares the first page, split below
        toks, pages = [9, 9, 1, 2, 3, 4, 5, 6], a.alloc(4)
        node = None
        for k in (1, 2, 4):  # the sequence's pages fill one after another
            if incremental and node is not None:
                base = t.depth(node) // 2
                _, got, node = t.insert(toks[base * 2 : k * 2], pages[base:k], start=node)
            else:
                _, got, node = t.insert(toks[: k * 2], pages[:k])
            assert t.depth(node) == k * 2
        t.check()
        trees.append((t.match_prefix(toks, touch=False)[:2], t.num_cached_pages, list(a.refs)))
    assert trees[0] == trees[1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1), max_size=90), st.lists(st.integers(0, 1), max_size=90))
def test_common_len_is_the_common_head(a, b):
    naive = 0
    while naive < min(len(a), len(b)) and a[naive] == b[naive]:
        naive += 1
    assert _common_len(tuple(a), b) == naive == _common_len(b, tuple(a))
    assert _common_len(a + [2] * 40, a + [3]) == len(a)


def test_radix_relock_equals_lock_then_unlock():
    """relock walks only below the old node when it can; the locks must come out as lock + unlock."""
    states = []
    for fast in (False, True):
        a = PageAllocator(32)
        t = RadixTree(2, a)
        t.insert([1, 1, 2, 2, 3, 3], a.alloc(3))
        t.insert([1, 1, 5, 5], a.alloc(2))
        _, _, n1 = t.match_prefix([1, 1, 2, 2, 9])  # splits: [1 1] -> [2 2] -> [3 3]
        _, _, n3 = t.match_prefix([1, 1, 2, 2, 3, 3])
        _, _, other = t.match_prefix([1, 1, 5, 5])
        t.lock(n1)
        for old, new in ((n1, n3), (n3, other), (other, n1)):  # down the path, across, up
            if fast:
                t.relock(old, new)
            else:
                t.lock(new)
                t.unlock(old)
            t.check()
        states.append(([(nd.key, nd.lock_ref) for nd in t.nodes()], t.evictable_pages))
    assert states[0] == states[1]


def test_radix_lock_blocks_eviction_and_lru_order():
    a = PageAllocator(8)
    t = RadixTree(2, a)
    old, new = [1, 2, 3, 4], [5, 6, 7, 8]
    for toks in (old, new):
        pages = a.alloc(2)
        t.insert(toks, pages)
        for p in pages:
            a.decref(p)  # the tree is the only owner now
    _, _, node = t.match_prefix(new + [0])
    t.lock(node)
    assert t.evictable_pages == 2
    assert t.evict(1) == 1  # LRU: the tail page of the older branch
    assert t.match_prefix(old, touch=False)[0] == 2
    assert t.evict(10) == 1  # the locked branch stays
    assert t.match_prefix(new, touch=False)[0] == 4
    t.unlock(node)
    with pytest.raises(PageError):
        t.unlock(node)
    assert t.evict_all() == 2 and a.num_free == 8
    t.check()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=14), min_size=1, max_size=12),
    st.lists(st.integers(0, 2), max_size=14),
)
def test_radix_match_is_longest_common_prefix(inserted, query):
    """Without eviction, a match finds the longest common prefix over all inserted full pages."""
    ps = 3
    a = PageAllocator(200)
    t = RadixTree(ps, a)
    for toks in inserted:
        pages = a.alloc(len(toks) // ps)
        t.insert(toks, pages)
        for p in pages:
            a.decref(p)
        t.check()
    best = 0
    for toks in inserted:
        full = toks[: len(toks) // ps * ps]
        k = 0
        while k < min(len(full), len(query)) and full[k] == query[k]:
            k += 1
        best = max(best, k)
    n, pages, _ = t.match_prefix(query)
    assert n == best and len(pages) == -(-n // ps)
    t.check()
    t.evict_all()
    assert a.num_free == 200


# -- the paged manager under random scheduler-like traffic --------------------------------------
class Shadow:
    """What each KV slot holds: the tuple of tokens whose last one's KV is there."""

    def __init__(self, kv: PagedKVManager):
        self.kv = kv
        self.slots: dict[tuple[int, int], tuple] = {}

    def copy(self, src: int, dst: int) -> None:
        for off in range(self.kv.page_size):
            if (src, off) in self.slots:
                self.slots[(dst, off)] = self.slots[(src, off)]
            else:
                self.slots.pop((dst, off), None)

    def compute(self, seq: Sequence, n: int) -> None:
        ps, refs = self.kv.page_size, self.kv.allocator.refs
        for pos in range(seq.num_computed_tokens):  # everything cached or computed reads right
            page = seq.block_table[pos // ps]
            assert self.slots.get((page, pos % ps)) == tuple(seq.token_ids[: pos + 1]), f"bad KV at {pos}"
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            page = seq.block_table[pos // ps]
            assert refs[page] == 1, f"write into shared page {page} (refs {refs[page]})"
            self.slots[(page, pos % ps)] = tuple(seq.token_ids[: pos + 1])
        seq.num_computed_tokens += n


def check_refs(kv: PagedKVManager, live: list[Sequence]) -> None:
    kv.check()
    expect = [0] * kv.num_pages
    if kv.tree is not None:
        for node in kv.tree.nodes():
            for p in node.pages:
                expect[p] += 1
    for s in live:
        for p in s.block_table:
            expect[p] += 1
    assert expect == kv.allocator.refs


PREFIXES = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 9, 9], [4, 4, 4, 4, 4, 4, 4, 4, 4]]

# Weighted so that sequences get admitted, run and finish often enough to be shared and evicted.
OPS = ["add"] * 3 + ["admit"] * 3 + ["step"] * 5 + ["finish"] * 2 + ["preempt", "flush"]
ops = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 10_000)), min_size=20, max_size=150)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, page_size=st.sampled_from([1, 2, 3, 4]), num_pages=st.integers(6, 24), caching=st.booleans())
def test_paged_manager_random_traffic(ops, page_size, num_pages, caching):
    kv = PagedKVManager(num_pages, page_size, prefix_caching=caching)
    shadow = Shadow(kv)
    waiting: list[Sequence] = []
    running: list[Sequence] = []
    for op, r in ops:
        if op == "add":
            base = PREFIXES[r % len(PREFIXES)]
            waiting.append(make_seq(base[: 1 + r % len(base)] + [r % 5] * (r // 7 % 4)))
        elif op == "admit" and waiting:
            seq = waiting[r % len(waiting)]
            cached = seq.num_computed_tokens = kv.match_prefix(seq)
            assert 0 <= cached < len(seq.token_ids)
            n = 1 + r % seq.num_uncomputed_tokens
            if kv.can_grow(seq, cached + n):
                kv.grow(seq, cached + n)
                seq.admitted = True
                waiting.remove(seq)
                running.append(seq)
                for src, dst in kv.pop_copies():
                    shadow.copy(src, dst)
                shadow.compute(seq, n)
            else:  # what the scheduler does when the admission does not fit
                kv.release(seq, finished=False)
                seq.num_computed_tokens = 0
                assert kv.pop_copies() == []
        elif op == "step" and running:
            seq = running[r % len(running)]
            if seq.num_uncomputed_tokens == 0:
                seq.token_ids.append(r % 3)  # the token sampled last step
            n = 1 + r % seq.num_uncomputed_tokens
            if kv.can_grow(seq, seq.num_computed_tokens + n):
                kv.grow(seq, seq.num_computed_tokens + n)
                assert kv.pop_copies() == []
                shadow.compute(seq, n)
        elif op == "finish" and running:
            seq = running.pop(r % len(running))
            kv.release(seq, finished=True)
        elif op == "preempt" and running:
            seq = running.pop(r % len(running))
            kv.release(seq, finished=False)
            seq.num_computed_tokens = 0
            waiting.append(seq)
        elif op == "flush":
            kv.flush()
        check_refs(kv, running)
        assert kv.prefix_hits <= kv.prefix_queries
    for seq in running:
        kv.release(seq, finished=True)
    check_refs(kv, [])
    kv.flush()
    assert kv.num_free_pages() == kv.num_pages
    if kv.tree is not None:
        assert kv.tree.num_cached_pages == 0 and kv.tree.evictable_pages == 0


def test_match_is_capped_and_mid_page_match_copies_on_write():
    kv = PagedKVManager(16, 4)
    a = make_seq(list(range(10)))
    assert kv.match_prefix(a) == 0
    kv.grow(a, 10)
    a.num_computed_tokens = 10
    kv.release(a, finished=True)  # caches pages 0 and 1 (tokens 0..7)
    assert kv.tree.num_cached_pages == 2
    # The same 8 tokens again: capped at 7 so the last token is computed; page 1 is shared and
    # would be written at slot 3, so it is copied.
    b = make_seq(list(range(8)))
    assert kv.match_prefix(b) == 7
    b.num_computed_tokens = 7
    copies = kv.pop_copies()
    assert len(copies) == 1 and copies[0][0] != b.block_table[1] and copies[0][1] == b.block_table[1]
    assert b.block_table[0] == kv.tree.match_prefix(list(range(4)), touch=False)[1][0]
    # A full-page prefix needs no copy.
    c = make_seq(list(range(4)) + [50, 51])
    assert kv.match_prefix(c) == 4 and kv.pop_copies() == []
    c.num_computed_tokens = 4
    kv.grow(b, 8)
    kv.grow(c, 6)
    assert kv.prefix_queries == 10 + 8 + 6 and kv.prefix_hits == 0 + 7 + 4
    kv.release(b, finished=False)
    kv.release(c, finished=False)
    kv.flush()
    assert kv.num_free_pages() == kv.num_pages


def test_grow_evicts_lru_cache_and_can_grow_counts_it():
    kv = PagedKVManager(4, 2)
    a = make_seq([1, 2, 3, 4, 5])
    kv.match_prefix(a)
    kv.grow(a, 5)
    a.num_computed_tokens = 5
    kv.release(a, finished=True)
    assert kv.num_free_pages() == 2 and kv.num_evictable_pages() == 2 and kv.usage() == 0.0
    b = make_seq([9, 9, 9, 9, 9, 9, 9, 9])
    assert kv.match_prefix(b) == 0
    assert kv.can_grow(b, 8) and not kv.can_grow(b, 9)
    kv.grow(b, 8)
    assert kv.tree.num_cached_pages == 0 and kv.num_free_pages() == 0
    kv.release(b, finished=False)
    kv.flush()
    assert kv.num_free_pages() == 4


def test_running_sequences_share_computed_pages():
    """Pages are cached as soon as they are computed, so a request admitted while another runs hits."""
    kv = PagedKVManager(16, 2)
    a = make_seq([1, 2, 3, 4, 5, 6])
    kv.match_prefix(a)
    kv.grow(a, 6)
    a.num_computed_tokens = 6
    a.token_ids.append(7)
    kv.grow(a, 7)  # the next decode step inserts the computed pages
    b = make_seq([1, 2, 3, 4, 5, 6, 8])
    assert kv.match_prefix(b) == 6
    assert b.block_table == a.block_table[:3]
    kv.release(a, True)
    kv.release(b, False)
    kv.flush()
    assert kv.num_free_pages() == 16


# -- policies ----------------------------------------------------------------------------------
def _cached_manager(prompts: list[list[int]], page_size: int = 2) -> PagedKVManager:
    kv = PagedKVManager(64, page_size)
    for p in prompts:
        s = make_seq(p)
        kv.match_prefix(s)
        kv.grow(s, len(p))
        s.num_computed_tokens = len(p)
        kv.release(s, finished=True)
    return kv


def test_lpm_orders_by_cached_prefix_then_arrival():
    kv = _cached_manager([[1, 2, 3, 4, 5, 6, 7, 8]])
    q = [
        make_seq([9, 9, 9], 0),
        make_seq([1, 2, 0], 1),
        make_seq([1, 2, 3, 4, 5, 6, 0], 2),
        make_seq([1, 2, 3, 4, 0], 3),
        make_seq([1, 2, 3, 4, 9], 4),
    ]
    pol = SCHEDULERS.get("lpm")(SchedulerConfig(policy="lpm"))
    got = [s.arrival_time for s in pol.order(q, kv)]
    assert got == [2, 3, 4, 1, 0]
    assert kv.tree.match_prefix([1, 2, 3], touch=False)[0] == 3  # peeking changed nothing


def test_dfs_weight_groups_heavy_branches():
    kv = _cached_manager([[1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 3, 3], [5, 5, 5, 5]])
    q = [
        make_seq([5, 5, 5, 5, 0], 0),  # light branch (1 request)
        make_seq([1, 1, 1, 1, 2, 2, 0], 1),  # heavy branch (3 requests under [1,1,1,1])
        make_seq([7, 7], 2),  # no match: last
        make_seq([1, 1, 1, 1, 3, 3, 0], 3),
        make_seq([1, 1, 1, 1, 2, 2, 9], 4),
    ]
    pol = SCHEDULERS.get("dfs-weight")(SchedulerConfig(policy="dfs-weight"))
    got = [s.arrival_time for s in pol.order(q, kv)]
    assert got == [1, 4, 3, 0, 2]


def test_policies_fall_back_to_arrival_order_without_a_tree():
    from nanoslg.cache.token_budget import TokenBudgetManager

    q = [make_seq([i, i], i) for i in range(5)]
    for name in ("lpm", "dfs-weight"):
        pol = SCHEDULERS.get(name)(SchedulerConfig(policy=name))
        assert pol.order(q, TokenBudgetManager(8, 2)) == q
        assert pol.order(q, PagedKVManager(8, 2, prefix_caching=False)) == q
    r1 = SCHEDULERS.get("random")(SchedulerConfig(policy="random", seed=3)).order(q, None)
    r2 = SCHEDULERS.get("random")(SchedulerConfig(policy="random", seed=3)).order(q, None)
    assert r1 == r2 and sorted(s.seq_id for s in r1) == sorted(s.seq_id for s in q)
