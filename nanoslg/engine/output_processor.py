"""Output processing, the one home of stop handling.

For each sampled token it decides whether the sequence ends here (EOS, a stop token id, a stop
string matched across token boundaries, max_tokens or the context) and what text to stream: text
that may still begin a stop string is held back. It also decides which ids the sampler must mask
while fewer than min_tokens were generated; the sampler only applies that mask. Requests, their
per-sequence text state and their streams are kept here until the last delta is emitted.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from nanoslg.core.sampling_params import SamplingParams
from nanoslg.core.sequence import SeqStatus, Sequence
from nanoslg.engine.detokenizer import IncrementalDetokenizer
from nanoslg.engine.metrics import EngineMetrics
from nanoslg.engine.outputs import CompletionOutput, Logprob, RequestOutput
from nanoslg.engine.stream import RequestStream


class SeqOutput:
    """What the engine keeps for one sequence besides the scheduler's Sequence."""

    __slots__ = (
        "seq",
        "req",
        "index",
        "detok",
        "text",
        "emitted",
        "stop_reason",
        "first_token_time",
        "last_token_time",
        "grammar",
        "num_out",
        "plain",
    )

    def __init__(self, seq: Sequence, req: RequestState, index: int, detok: IncrementalDetokenizer | None):
        self.seq, self.req, self.index, self.detok = seq, req, index, detok
        self.text = ""  # detokenized output so far (a matched stop string cut off)
        self.emitted = 0  # characters of text already streamed out
        self.stop_reason: object = None  # the stop string or token id that matched
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.grammar = None  # a structured.Matcher when the output is constrained
        # Tokens processed so far: a speculative step appends several tokens to the sequence at once,
        # and each is judged (max_tokens, the context) at its own place.
        self.num_out = 0
        # Token ids only, one sample, a folding stream, no stop strings, logprobs or grammar: a token
        # that does not end it takes process()'s short path (set by add_request and constrain).
        self.plain = False


class RequestState:
    def __init__(
        self, rid: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams, stream: RequestStream
    ):
        self.id, self.prompt, self.prompt_ids, self.params, self.stream = rid, prompt, prompt_ids, params, stream
        self.outs: list[SeqOutput] = []
        # Characters held back from the stream while they may still begin a stop string.
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.arrival = time.monotonic()


class OutputProcessor:
    def __init__(
        self,
        tokenizer,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        metrics: EngineMetrics,
        finish: Callable[[Sequence, str], None],
    ):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.finish = finish  # retires a sequence in the scheduler (frees its KV)
        self.requests: dict[str, RequestState] = {}
        self.outs: dict[int, SeqOutput] = {}  # seq_id -> its output state, while its request runs
        self.num_constrained = 0  # sequences of running requests with a grammar (none: no mask work)

    def min_tokens_stop_ids(self, params: SamplingParams) -> tuple[int, ...]:
        """Ids the sampler masks while fewer than min_tokens were generated: those that would stop."""
        if params.min_tokens == 0:
            return ()
        return (() if params.ignore_eos else self.eos_token_ids) + tuple(params.stop_token_ids)

    def add_request(
        self, rid: str, prompt: str | None, ids: list[int], params: SamplingParams, stream: RequestStream
    ) -> RequestState:
        """The request's state and its n sequences (not yet scheduled)."""
        req = self.requests[rid] = RequestState(rid, prompt, ids, params, stream)
        self.metrics.prompt_tokens += len(ids) * params.n  # each sample is a request (EngineMetrics)
        stop_ids = self.min_tokens_stop_ids(params)
        for i in range(params.n):
            # With a seed, sample i of n draws from seed + i: reproducible, yet independent samples.
            p = params if params.seed is None or i == 0 else dataclasses.replace(params, seed=params.seed + i)
            seq = Sequence(rid, ids, p, min_tokens_stop_ids=stop_ids)
            detok = (
                IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                if self.tokenizer is not None
                else None
            )
            so = SeqOutput(seq, req, i, detok)
            so.plain = detok is None and params.n == 1 and params.logprobs is None and not params.stop
            so.plain = so.plain and not stream.each_delta
            req.outs.append(so)
            self.outs[seq.seq_id] = so
        return req

    def constrain(self, req: RequestState, new_matcher: Callable[[], object]) -> None:
        """Gives each of the request's sequences a matcher of its own (n > 1: one each)."""
        for so in req.outs:
            so.grammar = new_matcher()
            so.plain = False
        self.num_constrained += len(req.outs)

    # -- a step's tokens -------------------------------------------------------------------------
    def process(
        self, sampled: list[tuple[Sequence, int, object]], now: float, grammars_done: Callable | None = None
    ) -> None:
        """Appends each sampled token's text and streams one delta per request. It runs once per step
        for every running sequence, so it is one pass, and a request of one sample emits at once.
        Constrained sequences advance their grammars first, in a pass of their own, and
        `grammars_done(ended)` runs right after it: the next step's masks need only the grammars, so
        they are filled while this step's text is processed (ended: seq_id -> "stop" | "abort")."""
        ended = self._advance_grammars(sampled) if self.num_constrained else {}
        if grammars_done is not None:
            grammars_done({sampled[i][0].seq_id: end for i, end in ended.items()})
        grouped: dict[str, list[CompletionOutput]] = {}  # requests of n > 1: one delta for all samples
        outs, finished, append, emit = self.outs, SeqStatus.FINISHED, self._append, self._emit
        plain = self._plain
        for i, (seq, tok, lp) in enumerate(sampled):
            so = outs.get(seq.seq_id)
            if so is None or seq.status is finished:  # its request is gone, or it was aborted just now
                continue
            if so.plain and plain(so, seq, tok, now):
                continue
            out = append(so, seq, tok, lp, now, ended.get(i) if ended else None)
            req = so.req
            if len(req.outs) == 1:
                if out.finish_reason is None and req.stream.put_one(out):
                    continue  # folded for a reader of the whole result
                emit(req, [out])
            else:
                grouped.setdefault(req.id, []).append(out)
        for rid, delta in grouped.items():
            req = self.requests.get(rid)
            if req is not None:
                self._emit(req, delta)

    def _advance_grammars(self, sampled: list[tuple[Sequence, int, object]]) -> dict[int, str]:
        """Every committed token advances its sequence's grammar; returns {index in `sampled`: "stop" |
        "abort"} where one ended (a speculating sequence brings several tokens: the first end counts,
        and its tokens after it are never shown to the grammar)."""
        ended, done, outs, finished = {}, set(), self.outs, SeqStatus.FINISHED
        for i, (seq, tok, _) in enumerate(sampled):
            so = outs.get(seq.seq_id)
            if so is None or so.grammar is None or seq.status is finished or seq.seq_id in done:
                continue
            end = so.grammar.advance(tok)
            if end is not None:
                ended[i] = end
                done.add(seq.seq_id)
        return ended

    def _plain(self, so: SeqOutput, seq: Sequence, tok: int, now: float) -> bool:
        """_append and put_one for a plain sequence's token that does not end it and is not its first
        (the same metrics and the same folded result, without a delta object); False otherwise, for
        the full path."""
        last = so.last_token_time
        if last is None:
            return False
        so.num_out += 1  # as _append counts it before judging the token
        if self._stop_reason(so, seq, tok, None) is not None:
            so.num_out -= 1  # the full path counts it again and ends the sequence
            return False
        m = self.metrics
        m.inter_token_latency.observe(now - last)
        m.generation_tokens += 1
        so.last_token_time = now
        so.req.stream.put_token(so.index, tok)
        return True

    def _append(
        self, so: SeqOutput, seq: Sequence, tok: int, lp, now: float, grammar_end: str | None
    ) -> CompletionOutput:
        """The delta for one token the scheduler appended to `seq`; ends the sequence if it stops."""
        req, m = so.req, self.metrics
        last = so.last_token_time
        if last is None:
            so.first_token_time = now
            m.time_to_first_token.observe(now - req.arrival)
            m.request_queue_time.observe((seq.first_scheduled_time or now) - req.arrival)
        else:
            m.inter_token_latency.observe(now - last)
        so.last_token_time = now
        m.generation_tokens += 1
        so.num_out += 1
        out = CompletionOutput(so.index, "", [tok])
        if req.params.logprobs is not None:
            out.logprobs = [Logprob(tok, lp[0], lp[1])] if lp is not None else []
        if so.detok is not None:
            so.text += so.detok.add(tok)
        reason = self._stop_reason(so, seq, tok, grammar_end)
        if reason is not None:
            self.finish(seq, reason)
            self._finished(so, now)
            out.finish_reason, out.stop_reason = reason, so.stop_reason
        if so.detok is not None:
            upto = max(so.emitted, len(so.text) - (0 if reason is not None else req.hold))
            out.text = so.text[so.emitted : upto]
            so.emitted = upto
        return out

    def _stop_reason(self, so: SeqOutput, seq: Sequence, tok: int, grammar_end: str | None) -> str | None:
        p = seq.params
        n_out = so.num_out
        # The grammar's end ("stop") does not wait for min_tokens, since nothing more could follow,
        # but a stop string matched at that token still cuts the text.
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_token_ids:
                return "stop"
            if tok in p.stop_token_ids:
                so.stop_reason = tok
                return "stop"
            if p.stop and so.detok is not None:
                for stop in p.stop:
                    at = so.text.find(stop, max(0, so.emitted - len(stop)))
                    if at >= 0:
                        so.text = so.text[:at]
                        so.stop_reason = stop
                        return "stop"
        if grammar_end is not None:
            return grammar_end
        if n_out >= p.max_tokens or seq.num_prompt_tokens + n_out >= self.max_model_len:
            return "length"
        return None

    # -- ends outside the token path -------------------------------------------------------------
    def end(self, so: SeqOutput, reason: str) -> None:
        """Ends one sequence without a token (an abort) and emits its last delta."""
        self.finish(so.seq, reason)
        self._finished(so, time.monotonic())
        self._emit(so.req, [CompletionOutput(so.index, finish_reason=reason)])

    def _finished(self, so: SeqOutput, now: float) -> None:
        """A sequence ended: the per-request metrics, each sample counted as one request."""
        m, seq = self.metrics, so.seq
        n_out = so.num_out
        m.e2e_request_latency.observe(now - so.req.arrival)
        m.request_prompt_tokens.observe(len(so.req.prompt_ids))
        m.request_generation_tokens.observe(n_out)
        if n_out > 1 and so.first_token_time is not None:
            m.time_per_output_token.observe((now - so.first_token_time) / (n_out - 1))
        m.requests_finished[seq.finish_reason] = m.requests_finished.get(seq.finish_reason, 0) + 1

    def fail_all(self, error: BaseException) -> None:
        for req in self.requests.values():
            req.stream.put(error)
        self.requests.clear()
        self.outs.clear()
        self.num_constrained = 0

    def _emit(self, req: RequestState, outs: list[CompletionOutput]) -> None:
        done = req.outs[0].seq.finished if len(req.outs) == 1 else all(so.seq.finished for so in req.outs)
        if len(outs) > 1:
            outs.sort(key=lambda o: o.index)
        seq0 = req.outs[0].seq
        req.stream.put(RequestOutput(req.id, req.prompt_ids, outs, done, seq0.num_cached_tokens, req.prompt))
        if done:
            for so in req.outs:
                self.outs.pop(so.seq.seq_id, None)
                if so.grammar is not None:
                    self.num_constrained -= 1
            self.requests.pop(req.id, None)
