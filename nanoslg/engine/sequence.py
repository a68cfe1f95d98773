"""A sequence: one completion of one request, as the scheduler and cache see it."""
from __future__ import annotations

import enum
import itertools
import time
from typing import Optional

from nanoslg.engine.sampling_params import SamplingParams

_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Sequence:
    """Token state plus the bookkeeping the scheduler, the KV manager and the detokenizer need."""

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: Optional[float] = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.prompt_token_ids = prompt_token_ids
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + output, grows by one per step
        self.params = params
        self.status = SeqStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache or being written by a step in flight
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.block_table: list[int] = []  # pages, for paged KV managers
        self.kv_tokens = 0  # tokens the KV manager has reserved for this sequence
        self.inflight = 0  # steps holding this sequence that have not come back yet
        self.num_pending = 0  # tokens sampled in flight, not yet appended to token_ids
        self.admitted = False  # has been admitted at least once (for num_cached_tokens)
        self.sampler_registered = False  # the sampling rank has this sequence's params
        self.eos_token_ids: tuple[int, ...] = ()  # set by the engine from the checkpoint
        self.finish_reason: Optional[str] = None
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None
        self.num_preemptions = 0
        self.logprobs: list = []  # per output token: Logprob
        self.detok = None  # the engine's IncrementalDetokenizer (None without a tokenizer)
        self.text = ""  # detokenized output so far (stop strings cut off)
        self.emitted = 0  # characters of text already streamed out
        self.stop_reason: object = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

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
        return (f"Sequence(id={self.seq_id}, req={self.request_id}, {self.status.name}, "
                f"tokens={len(self.token_ids)}, computed={self.num_computed_tokens})")
