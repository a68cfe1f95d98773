"""Cache-aware admission policies: lpm, dfs-weight, and a seeded random order (a baseline).

They read the paged manager's radix tree (`kv.tree`, `kv.peek_prefix`); on a manager without one
(non-paged backends, or prefix caching off) they keep arrival order, like fcfs.
"""

from __future__ import annotations

import random
from collections import defaultdict

from nanoslg.cache.kv_manager import KVManager
from nanoslg.core.config import SchedulerConfig
from nanoslg.core.registry import SCHEDULERS
from nanoslg.core.sequence import Sequence
from nanoslg.scheduler.policy import Policy


def _tree(kv: KVManager):
    return getattr(kv, "tree", None)


@SCHEDULERS.register("lpm")
class LongestPrefixMatchPolicy(Policy):
    """Longest cached prefix first (SGLang's LPM); ties keep arrival order."""

    def order(self, waiting: list[Sequence], kv: KVManager) -> list[Sequence]:
        if _tree(kv) is None or len(waiting) < 2:
            return waiting
        matched = {s.seq_id: kv.peek_prefix(s.token_ids) for s in waiting}
        return sorted(waiting, key=lambda s: -matched[s.seq_id])  # stable: arrival order on ties


@SCHEDULERS.register("dfs-weight")
class DFSWeightPolicy(Policy):
    """SGLang's DFS-weight: each request sits at the tree node where its cached prefix ends; a node's
    weight is the number of requests in its subtree. Walking the tree depth first, heaviest child
    first, emits requests sharing a heavy branch together, so their shared pages stay hot."""

    def order(self, waiting: list[Sequence], kv: KVManager) -> list[Sequence]:
        tree = _tree(kv)
        if tree is None or len(waiting) < 2:
            return waiting
        at_node = defaultdict(list)
        for s in waiting:  # arrival order within a node
            at_node[tree.match_prefix(s.token_ids, touch=False)[2]].append(s)
        weight = tree.subtree_weights({n: len(v) for n, v in at_node.items()})
        out: list[Sequence] = []
        # Iterative post-order (children heaviest first, then the node's own requests), as SGLang.
        stack = [(tree.root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                out.extend(at_node.get(node, ()))
                continue
            stack.append((node, True))
            kids = [c for c in node.children.values() if weight[c] > 0]
            kids.sort(key=lambda c: -weight[c])
            stack.extend((c, False) for c in reversed(kids))
        return out


@SCHEDULERS.register("random")
class RandomPolicy(Policy):
    """A seeded shuffle (scheduler.seed): a baseline for the cache-aware policies."""

    def __init__(self, cfg: SchedulerConfig):
        super().__init__(cfg)
        self.rng = random.Random(cfg.seed)

    def order(self, waiting: list[Sequence], kv: KVManager) -> list[Sequence]:
        out = list(waiting)
        self.rng.shuffle(out)
        return out
