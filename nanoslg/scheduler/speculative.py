"""Which running sequences speculate in a step, and what they propose (rank 0, pure Python).

A decoding sequence speculates when its request allows it (below) and the step's token budget has
room: it feeds its last token plus k proposals and the target verifies all k + 1 positions in one
forward. `speculative=ngram` proposes here, by prompt lookup; `speculative=draft` leaves k
PLACEHOLDERs that the draft model's runner fills on the device rank, and keeps the draft's KV
accounting: a token budget like the sdpa backend's (the draft's pool is an sdpa pool of its own,
as many pages as the target's), and how many of the sequence's tokens the draft has read.

Requests that do not speculate (they decode one token a step, in the same steps): penalties, and
min_tokens while it still masks stop ids (the sampler's per-token state, which each proposal would
change). Structured outputs and logit_bias do: the verify step masks each position with the grammar's
state after the proposals before it (engine/structured.py) and adds the bias to every position.
Logprobs come from the verify rows.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from nanoslg.core.config import SpeculativeConfig
from nanoslg.core.plan import PLACEHOLDER, SeqStep
from nanoslg.core.sequence import Sequence


def ngram_propose(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Prompt lookup: for n from max_n down to min_n, the latest earlier occurrence of the last n
    tokens; the k tokens that followed it are the proposals. [] when nothing matches. A match closer
    to the end than k tokens means the text repeats with that period (a loop, which greedy decoding
    falls into), so the proposals go on repeating it rather than stop at the end of the text."""
    L = len(tokens)
    if L < 2 or k <= 0:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        # Windows over all but the last token, so each match has at least one token after it.
        hits = np.flatnonzero((sliding_window_view(arr[:-1], n) == arr[L - n :]).all(axis=1))
        if hits.size:
            at = int(hits[-1]) + n
            period = L - at  # how far back the match lies
            return [tokens[at + i % period] for i in range(k)]
    return []


def can_speculate(seq: Sequence) -> bool:
    p = seq.params
    return not p.has_penalties and seq.num_output_tokens >= p.min_tokens


class Speculator:
    def __init__(self, cfg: SpeculativeConfig, num_pages: int, page_size: int):
        self.k = cfg.num_tokens
        self.draft = cfg.method == "draft"
        self.min_n, self.max_n = cfg.ngram.min_n, cfg.ngram.max_n
        self.num_pages, self.page_size = num_pages, page_size
        self.used_pages = 0  # draft pool pages reserved by live sequences
        self._reserved: dict[int, int] = {}  # seq id -> draft KV tokens reserved (never shrinks: sdpa keeps pages)
        self._read: dict[int, int] = {}  # seq id -> tokens the draft's KV holds
        # Metrics (vLLM's spec_decode counters): verify steps of a sequence, tokens proposed, accepted.
        self.num_drafts = self.num_draft_tokens = self.num_accepted = 0

    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def propose(self, seq: Sequence, budget: int) -> list[int]:
        """Proposals for a decoding sequence (its one uncomputed token is its last), within `budget`
        tokens for the whole row; [] when it does not speculate this step. Never more than the
        tokens max_tokens still allows after the target's own one."""
        left = seq.params.max_tokens
        k = min(self.k, budget - 1, self.k if left is None else left - seq.num_output_tokens - 1)
        if k <= 0 or not can_speculate(seq):
            return []
        if not self.draft:
            return ngram_propose(seq.token_ids, k, self.min_n, self.max_n)
        # The draft reads up to position start + k - 1: its pool must hold start + k tokens.
        end = len(seq.token_ids) - 1 + k
        have = self._reserved.get(seq.seq_id, 0)
        extra = self._pages(end) - self._pages(have)
        if extra > 0:
            if extra > self.num_pages - self.used_pages:
                return []  # the draft pool is full: decode one token this step
            self.used_pages += extra
            self._reserved[seq.seq_id] = end
        return [PLACEHOLDER] * k

    def fill(self, step: SeqStep, seq: Sequence) -> None:
        """Draft mode: what the draft must read before it proposes (its catch-up after the last step)."""
        if self.draft:
            read = self._read.get(seq.seq_id, 0)
            step.draft_ids, step.draft_start = seq.token_ids[read : step.start + 1], read

    def verified(self, seq: Sequence, step: SeqStep, accepted: int) -> None:
        """A verify step came back with `accepted` of its step.spec proposals kept."""
        self.num_drafts += 1
        self.num_draft_tokens += step.spec
        self.num_accepted += accepted
        if self.draft:  # the draft read the last token and proposals 1..spec-1: valid while accepted
            self._read[seq.seq_id] = step.start + min(accepted + 1, step.spec)

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was preempted: the draft's KV of it is gone (plan.freed)."""
        self._read.pop(seq.seq_id, None)
        self.used_pages -= self._pages(self._reserved.pop(seq.seq_id, 0))
