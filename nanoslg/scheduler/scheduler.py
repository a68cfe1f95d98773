"""Continuous batching with chunked prefill under a token budget, and preemption by recompute.

Each step: running sequences first (oldest first; a decode is one token, an unfinished prefill takes
the next chunk), then waiting sequences in the policy's order while the token budget, the running
cap and KV memory allow; beside running sequences, a new one only if its whole prompt fits next to
the pages their own prompts still need. When KV runs out (decodes grow), the newest running sequence
is preempted: its KV is released and it waits again (first in line) to recompute prompt + outputs,
so no token changes.

With `lookahead` (overlap scheduling) a sequence whose sampling step is still in flight is scheduled
again, one token ahead: its input is a PLACEHOLDER for the token that step samples. Such a sequence
may still be preempted: its step in flight writes pages it no longer owns, but steps run in stream
order, so that write lands before any later owner's; its sampled token is kept, and it is re-admitted
only after that step came back (never in the step that preempted it).
"""

from __future__ import annotations

import itertools
import time

from nanoslg.cache.kv_manager import KVManager
from nanoslg.core.config import SchedulerConfig
from nanoslg.core.plan import PLACEHOLDER, NewSeq, SeqStep, StepPlan, StepResult
from nanoslg.core.sequence import SeqStatus, Sequence
from nanoslg.scheduler.policy import Policy
from nanoslg.scheduler.speculative import Speculator

MAX_HELD = 32  # waiting sequences held back per step because their next page is computed in it


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVManager, policy: Policy):
        self.cfg = cfg
        self.kv = kv
        self.policy = policy
        self.waiting: list[Sequence] = []  # arrival order
        self.preempted: list[Sequence] = []  # re-admitted before anything new, oldest first
        self.running: list[Sequence] = []  # admission order
        self._live: dict[int, Sequence] = {}  # every sequence added and not finished, by id
        self.num_preemptions = 0
        self._freed: list[int] = []
        self._finished: list[int] = []
        self._step_ids = itertools.count()
        self.lookahead = False  # the engine sets it when the executor overlaps steps
        self.speculator: Speculator | None = None  # speculative decoding (the builder sets it; no lookahead then)

    # -- queue changes --------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._live[seq.seq_id] = seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (finished or aborted): release its KV and drop it from the queues."""
        seq.finish_reason = reason
        self._live.pop(seq.seq_id, None)
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.preempted:
            self.preempted.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.release(seq, finished=reason != "abort")
        if self.speculator is not None:
            self.speculator.release(seq)
        seq.status = SeqStatus.FINISHED
        self._freed.append(seq.seq_id)
        self._finished.append(seq.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.release(seq, finished=False)
        if self.speculator is not None:
            self.speculator.release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._freed.append(seq.seq_id)
        self.preempted.append(seq)
        self.preempted.sort(key=lambda s: (s.arrival_time, s.seq_id))

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.preempted)

    @property
    def backlog(self) -> int:
        """Waiting sequences beyond the free places in the running batch: those the next steps cannot
        admit, whatever their order (a burst that fits the batch is not a backlog)."""
        return max(0, self.num_waiting - max(0, self.cfg.max_num_seqs - len(self.running)))

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.preempted)

    def commit(self, plan: StepPlan, result: StepResult) -> list[tuple[Sequence, int, object]]:
        """A step came back: its sequences leave flight and each live one that sampled appends its
        token. Returns (sequence, token, logprob entry) for those, in plan order; a sequence that
        finished while the step was in flight (lookahead) is skipped and its token dropped."""
        live = self._live
        for st in plan.seqs:
            seq = live.get(st.seq_id)
            if seq is not None:
                seq.inflight -= 1
        if plan.spec:
            return self._commit_spec(plan, result)
        out = []
        lps = result.logprobs or itertools.repeat(None)
        for seq_id, tok, lp in zip(result.seq_ids, result.token_ids, lps):
            seq = live.get(seq_id)
            if seq is not None:
                seq.num_pending -= 1
                seq.token_ids.append(tok)
                out.append((seq, tok, lp))
        return out

    def _commit_spec(self, plan: StepPlan, result: StepResult) -> list[tuple[Sequence, int, object]]:
        """commit for a step where sequences verified proposals: each appends every token it emits,
        and its computed tokens go back to what was accepted. The KV of rejected proposals is dropped
        (pages past the accepted tokens freed), so the prefix tree only ever sees accepted tokens."""
        live, out = self._live, []
        steps = {st.seq_id: st for st in plan.seqs if st.spec}
        lps = result.logprobs or itertools.repeat(None)
        more_lps = result.more_logprobs or itertools.repeat(itertools.repeat(None))
        for seq_id, tok, lp, more, mlp in zip(result.seq_ids, result.token_ids, lps, result.more_tokens, more_lps):
            seq = live.get(seq_id)
            if seq is None:
                continue
            seq.num_pending -= 1
            seq.token_ids.append(tok)
            out.append((seq, tok, lp))
            st = steps.get(seq_id)
            if st is None:
                continue
            for t, tlp in zip(more, mlp):
                seq.token_ids.append(t)
                out.append((seq, t, tlp))
            # The last token and the accepted proposals have their KV; the target's own token has not.
            seq.num_computed_tokens = st.start + len(more) + 1
            self.kv.shrink(seq, seq.num_computed_tokens)
            self.speculator.verified(seq, st, len(more))
        return out

    # -- one step ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        budget = self.cfg.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        preemptions_before = self.num_preemptions
        spec, proposals = self.speculator, {}  # seq id -> its proposals, for those that speculate

        computing: set = set()  # next-page keys of the prefill chunks in this step (prefix caching)
        running, lookahead, kv = SeqStatus.RUNNING, self.lookahead, self.kv
        # Runs for every running sequence every step, so the checks are written out here: tokens left
        # to compute, and whether the sequence may run (not in flight, or, with lookahead, in exactly
        # one step that samples its next input). A decode that stays inside its pages costs one
        # has_room call.
        for seq in list(self.running):
            if budget == 0:
                break
            computed = seq.num_computed_tokens
            unc = len(seq.token_ids) + seq.num_pending - computed
            if (
                seq.status is not running
                or unc == 0
                or (seq.inflight and not (lookahead and seq.inflight == 1 and seq.num_pending == 1))
            ):
                continue
            n = unc if unc < budget else budget
            if spec is not None and unc == 1:
                props = spec.propose(seq, budget)
                end = computed + 1 + len(props)
                if props and (kv.has_room(seq, end) or kv.can_grow(seq, end)):  # never preempt to speculate
                    proposals[seq.seq_id] = props
                    n += len(props)
            key = kv.next_page_key(seq) if n > 1 else None  # before grow: from the chunk's start
            total = computed + n
            if not kv.has_room(seq, total):
                if not self._make_room(seq, total, chosen):
                    continue
                self.kv.grow(seq, total)
            chosen.append((seq, n))
            computing.add(key)
            budget -= n

        if self.num_preemptions == preemptions_before:  # admitting right after a preemption would only thrash
            queue = self.preempted + self.policy.order(self.waiting, self.kv)
            held = 0
            # Pages the running sequences still need to finish their prompts (a recompute included):
            # beside a running sequence, a new one is admitted only if its whole prompt fits next to
            # them, so no prompt is admitted only to be preempted (or to preempt) a few chunks on. With
            # nothing running, the first is admitted on its first chunk, as before: progress is sure.
            owed = self._owed_prompt_pages() if queue and self.running else 0
            for seq in queue:
                if budget == 0 or len(self.running) >= self.cfg.max_num_seqs:
                    break
                if seq.inflight:  # preempted while its step ran: its token is not back yet
                    continue
                cached = seq.num_computed_tokens = self.kv.match_prefix(seq)
                key = self.kv.next_page_key(seq)
                if key is not None and key in computing:
                    # Another sequence computes this page in this step: wait one step and hit the
                    # cache instead of computing the shared prefix twice (SGLang's in-batch prefix
                    # caching). Scanning stops after a few such holds to keep the step cheap.
                    self.kv.release(seq, finished=False)
                    seq.num_computed_tokens = 0
                    held += 1
                    if held >= MAX_HELD:
                        break
                    continue
                computing.add(key)
                if not seq.admitted:
                    seq.num_cached_tokens = cached
                n = min(seq.num_uncomputed_tokens, budget)
                whole = len(seq.token_ids)
                if not self.kv.can_grow(seq, seq.num_computed_tokens + n) or (
                    self.running and self.kv.pages_needed(seq, whole) + owed > self.kv.num_available_pages()
                ):
                    self.kv.release(seq, finished=False)  # undo the prefix match
                    seq.num_computed_tokens = 0
                    break
                self.kv.grow(seq, seq.num_computed_tokens + n)
                owed += self.kv.pages_needed(seq, whole)
                self._admit(seq)
                chosen.append((seq, n))
                budget -= n

        if not chosen and not self._freed:
            return None
        return self._plan(chosen, proposals)

    def _owed_prompt_pages(self) -> int:
        """Pages the running sequences still need for the prompt tokens (and, after a preemption, the
        outputs) they have not computed yet; a decoding sequence owes none."""
        kv, owed = self.kv, 0
        for s in self.running:
            known = len(s.token_ids)
            if s.num_computed_tokens < known - 1:
                owed += max(0, kv.pages_needed(s, known))
        return owed

    def _make_room(self, seq: Sequence, total: int, chosen: list) -> bool:
        """Preempt the newest other running sequences until `seq` fits; False if seq itself went."""
        while not self.kv.can_grow(seq, total):
            taken = {s.seq_id for s, _ in chosen}
            victims = [s for s in self.running if s.seq_id not in taken and (self.lookahead or not s.inflight)]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit(self, seq: Sequence) -> None:
        if seq in self.preempted:
            self.preempted.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        seq.admitted = True
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        self.running.append(seq)

    def _plan(self, chosen: list[tuple[Sequence, int]], proposals: dict[int, list[int]]) -> StepPlan:
        steps, new = [], []
        paged = self.kv.paged
        decode = True  # every sequence feeds one token and samples (what CUDA graphs replay)
        spec = False  # some sequence verifies proposals
        for seq, n in chosen:
            start = seq.num_computed_tokens
            tokens = seq.token_ids
            known = len(tokens)
            props = proposals.get(seq.seq_id) if proposals else None
            table = list(seq.block_table) if paged else None  # a copy: the manager may change the live one
            if props is not None:  # the last token and the proposals, verified at every position
                step = SeqStep(seq.seq_id, [tokens[start], *props], start, True, table, spec=len(props))
                self.speculator.fill(step, seq)
                decode, spec = False, True
            else:
                if n == 1:
                    ids = [tokens[start] if start < known else PLACEHOLDER]  # lookahead: being sampled
                else:
                    ids = tokens[start : start + n]
                    if len(ids) < n:
                        ids.append(PLACEHOLDER)
                    decode = False
                step = SeqStep(seq.seq_id, ids, start, start + n == known + seq.num_pending, table)
            steps.append(step)
            seq.num_computed_tokens = start + n
            if step.sample:
                seq.num_pending += 1
                if not seq.sampler_registered:
                    seq.sampler_registered = True
                    new.append(
                        NewSeq(
                            seq.seq_id,
                            seq.params,
                            seq.prompt_token_ids,
                            seq.output_token_ids,
                            list(seq.min_tokens_stop_ids),
                        )
                    )
            else:
                decode = False
            seq.inflight += 1
        plan = StepPlan(
            next(self._step_ids),
            steps,
            new,
            self._freed,
            self._finished,
            self.kv.pop_copies(),
            decode=decode and bool(steps),
            spec=spec,
        )
        self._freed, self._finished = [], []
        return plan
