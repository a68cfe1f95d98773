"""A sequence: one completion of one request, as the scheduler and the KV managers see it.

Each field has one writer. The engine fills the request's facts at creation (ids, params, the stop
ids the sampler masks); the scheduler owns the queue state and the token counts (status,
num_computed_tokens, inflight, num_pending, and token_ids as steps come back); the KV manager owns
the sequence's KV (block_table, kv_tokens). What only the engine needs (text, detokenizer, logprobs,
stop reason) lives in the engine's per-request state.
"""

from __future__ import annotations

import enum
import itertools
import time

from nanoslg.core.sampling_params import SamplingParams

_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        min_tokens_stop_ids: tuple[int, ...] = (),
    ):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + output, grows by one per step
        self.params = params
        # Ids the sampler masks while fewer than params.min_tokens were generated (the engine's
        # output processor decides them; the sampler only applies the mask).
        self.min_tokens_stop_ids = min_tokens_stop_ids
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        # -- the scheduler's --------------------------------------------------------------------
        self.status = SeqStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache or being written by a step in flight
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.inflight = 0  # steps holding this sequence that have not come back yet
        self.num_pending = 0  # tokens sampled in flight, not yet appended to token_ids
        self.admitted = False  # has been admitted at least once (for num_cached_tokens)
        self.sampler_registered = False  # the sampling rank has this sequence's params
        self.finish_reason: str | None = None
        self.first_scheduled_time: float | None = None
        self.num_preemptions = 0
        # -- the KV manager's -------------------------------------------------------------------
        self.block_table: list[int] = []  # pages, for paged KV managers
        self.kv_tokens = 0  # tokens the KV manager has reserved for this sequence

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id}, {self.status.name}, "
            f"tokens={len(self.token_ids)}, computed={self.num_computed_tokens})"
        )
