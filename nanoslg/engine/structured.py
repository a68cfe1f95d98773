"""Grammar-constrained decoding with llguidance: a request's spec (JSON schema, regex, choice, grammar)
is compiled once, off the event loop, and cached by the spec; each sequence keeps its own matcher,
advanced by the output processor with every token the sequence commits; before a step samples, the
matchers of its constrained rows fill one bitmask per row (llguidance's layout), which the sampler
applies on the device.

When the masks are filled: right after scheduling when every constrained row's previous token is
known; with overlap scheduling a row fed the token of the step still in flight cannot know its mask
yet, so that plan is launched with `sample_later`, and once the step before has advanced the
grammars its masks are filled on a thread of their own (llguidance fills rows in parallel, without
the GIL) while the loop processes that step's text; the step's sampling waits for them
(AsyncEngine._run_overlapped).

Filling is spread over SHARDS threads, each with its own compile of every grammar: matchers copied
from one compile share its lazily built lexer, whose lock serializes their fills, while separate
compiles fill in parallel (experiments/structured_mask_threads.py). A sequence's matcher comes from
one shard's compile, round-robin, and that shard's thread fills its mask. (One call into an
llguidance executor of SHARDS threads over every row is the alternative, compared with this one in
experiments/structured_fill_modes.py; see experiments/README.md.)

The grammar's end is a stop: when a matcher can take nothing more (the JSON object closed, the choice
complete), the sequence ends with "stop" at once, without sampling an EOS; where the grammar could
go on, it allows the EOS ids as well and an EOS ends it. A token the matcher refuses (it cannot be
sampled under the mask, unless the grammar hit one of llguidance's limits) ends the sequence with
"abort".
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance as llg
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark

from nanoslg.core.errors import RequestError
from nanoslg.core.plan import PLACEHOLDER, StepPlan, TokenMasks
from nanoslg.core.sampling_params import StructuredOutputs
from nanoslg.engine.outputs import CompletionOutput, RequestOutput

log = logging.getLogger("nanoslg.structured")

CACHE_SIZE = 512  # compiled specs kept (and specs that failed, so a bad one is refused at once)
# Mask threads: all CPUs but four (the loop, the step thread, the collector, the mask filler), up to 12.
SHARDS = max(1, min(12, (os.cpu_count() or 2) - 4))
# Compact JSON unless a schema's "x-guidance" asks for more: with free whitespace between tokens a
# model (a random one always) can spend its whole budget on blank lines.
JSON_DEFAULTS = {"whitespace_flexible": False}
# llguidance's token slices: token sets precomputed per regex, OR-ed into a mask wherever the lexer
# allows all of a slice, so only the tokens of the other slices are walked. A token joins the first
# slice it matches, so string bodies go narrow to wide: inside a string of bounded length with r
# characters left, every slice up to r characters is taken whole (the defaults' widths 1-10, 1-30
# leave most tokens to walk there). Same masks as the defaults (tests/test_structured.py).
_BODY = '[^"\\\\\\x00-\\x1F\\x7F]'
SLICES = ["[\\x20\\x0A\\x0D\\x09]+", *(f"{_BODY}{{1,{k}}}" for k in (*range(1, 25), 32)), _BODY + "+"]


class Matcher:
    """One sequence's place in its grammar (`shard`: the compile it was copied from)."""

    __slots__ = ("m", "shard")

    def __init__(self, m: llg.LLMatcher, shard: int = 0):
        self.m, self.shard = m, shard

    def advance(self, token: int) -> str | None:
        """Consumes a committed token; returns "stop" when the grammar is complete, "abort" when it
        refused the token, else None."""
        if not self.m.consume_token(token):
            log.warning("the grammar refused token %d: %s", token, self.m.get_error().splitlines()[:1])
            return "abort"
        return "stop" if self.m.is_stopped() else None


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...], metrics=None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.words = (vocab_size + 31) // 32  # int32 words per mask row
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nanoslg-grammar")
        self._lock = threading.Lock()
        self._ll_tokenizer: llg.LLTokenizer | None = None
        self._cache: collections.OrderedDict[str, list[llg.LLMatcher] | RequestError] = collections.OrderedDict()
        self._compiling: dict[str, asyncio.Future] = {}
        self._executors: list[llg.LLExecutor] | None = None  # one single-threaded executor per shard
        self._next_shard = itertools.count()
        # Every mask fill runs from this one thread: fills never overlap, so no matcher is read twice at
        # once; it hands each shard's rows to that shard's thread.
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanoslg-masks")
        self._shards = ThreadPoolExecutor(max_workers=SHARDS, thread_name_prefix="nanoslg-mask-shard")
        self.metrics = metrics  # EngineMetrics: fill time is added to its step profile's masks_s
        # Requests waiting for their grammar before they reach the scheduler: id -> (task, stream, ids, n)
        self.waiting: dict[str, tuple] = {}

    # -- compiling -------------------------------------------------------------------------------
    def cached(self, spec: StructuredOutputs) -> list[llg.LLMatcher] | None:
        """The compiled grammar (a matcher at its start per shard) if this spec was compiled; raises
        the RequestError if it failed."""
        key = spec.key()
        hit = self._cache.get(key)
        if hit is None:
            return None
        self._cache.move_to_end(key)
        if isinstance(hit, RequestError):
            raise RequestError(str(hit), param=hit.param)
        return hit

    async def compile(self, spec: StructuredOutputs) -> list[llg.LLMatcher]:
        """Compiles in the thread pool (once for equal specs, however many requests wait for it)."""
        hit = self.cached(spec)
        if hit is not None:
            return hit
        key = spec.key()
        fut = self._compiling.get(key)
        if fut is None:
            fut = self._compiling[key] = asyncio.get_running_loop().run_in_executor(self._pool, self._build, spec)
            fut.add_done_callback(lambda f, k=key: self._store(k, f))
        await asyncio.shield(fut)  # a waiter that goes away does not cancel the others' compile
        hit = self.cached(spec)
        if hit is None:  # evicted at once by a burst of other specs: the result is still at hand
            result = fut.result()
            if isinstance(result, RequestError):
                raise RequestError(str(result), param=result.param)
            return result
        return hit

    def start_when_compiled(self, rid: str, spec: StructuredOutputs, stream, ids: list[int], n: int, start) -> None:
        """add_request of a spec not compiled yet: `start(compiled)` runs on the loop once it is; a spec
        that does not compile ends the stream with its RequestError."""

        async def run() -> None:
            try:
                start(await self.compile(spec))
            except Exception as e:  # RequestError (the spec), EngineDeadError, or worse: never a silent stream
                stream.put(e)
            finally:
                self.waiting.pop(rid, None)

        self.waiting[rid] = (asyncio.ensure_future(run()), stream, ids, n)

    def abort(self, rid: str) -> bool:
        """Aborts a request still waiting for its grammar (its stream ends); False if none is."""
        entry = self.waiting.pop(rid, None)
        if entry is None:
            return False
        task, stream, ids, n = entry
        task.cancel()
        stream.put(RequestOutput(rid, ids, [CompletionOutput(i, finish_reason="abort") for i in range(n)], True))
        return True

    def _store(self, key: str, fut: asyncio.Future) -> None:
        self._compiling.pop(key, None)
        if fut.cancelled() or fut.exception() is not None:
            return
        self._cache[key] = fut.result()
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def _build(self, spec: StructuredOutputs) -> list[llg.LLMatcher] | RequestError:
        """Runs in the pool: the spec as an llguidance grammar, checked by building its matcher, then
        compiled once more for each other shard."""
        param = f"structured_outputs.{spec.kind}"
        try:
            tok = self._llg_tokenizer()
            grammar = _grammar(spec)
        except RequestError as e:
            return e
        except Exception as e:  # the converters raise their own kinds on a bad grammar or schema
            return RequestError(f"the {spec.kind} does not compile: {_first_lines(e)}", param=param)
        m = llg.LLMatcher(tok, grammar, log_level=0)
        if m.is_error():
            return RequestError(f"the {spec.kind} does not compile: {_first_lines(m.get_error())}", param=param)
        return [m] + [llg.LLMatcher(tok, grammar, log_level=0) for _ in range(SHARDS - 1)]

    def _llg_tokenizer(self) -> llg.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                if self.tokenizer is None:
                    raise RequestError("this model has no tokenizer: structured outputs need one")
                from llguidance.hf import from_tokenizer  # imports transformers: only where needed

                n_vocab = max(self.vocab_size, len(self.tokenizer))
                try:
                    self._ll_tokenizer = from_tokenizer(
                        self.tokenizer, n_vocab=n_vocab, eos_token=list(self.eos_token_ids) or None, slices=SLICES
                    )
                except ValueError as e:
                    raise RequestError(f"structured outputs need a fast tokenizer: {e}") from None
                except Exception as e:  # e.g. an llguidance before 1.7 given several EOS ids: not the spec's fault
                    raise RequestError(
                        f"structured outputs are unavailable: llguidance {getattr(llg, '__version__', '?')} could not "
                        f"read this model's tokenizer ({type(e).__name__}: {_first_lines(e, 2)})"
                    ) from None
                self.words = (n_vocab + 31) // 32
            return self._ll_tokenizer

    def new_matcher(self, compiled: list[llg.LLMatcher]) -> Matcher:
        shard = next(self._next_shard) % len(compiled)
        return Matcher(compiled[shard].deep_copy(), shard)

    # -- masks ---------------------------------------------------------------------------------------
    def attach(self, plan: StepPlan, outs: dict, overlap: bool) -> None:
        """Right after scheduling: the plan's masks, or sample_later where a constrained row's mask
        waits for a token still in flight."""
        rows = _constrained(plan, outs)
        if not rows:
            return
        if overlap and any(so.seq.num_pending > 1 for so, _ in rows):
            plan.sample_later = True
            return
        # A draft model's proposals are filled on the device rank: those rows' masks wait for them.
        now, drafted = [], []
        for so, st in rows:
            (drafted if st.spec and st.token_ids[1] == PLACEHOLDER else now).append((so, st))
        if drafted:
            rows = now
            plan.spec_masks = lambda: self._filler.submit(self._fill, drafted).result().spec
        plan.masks = self._filler.submit(self._fill, rows).result()

    def fill_later(self, plan: StepPlan, outs: dict, ended: dict[int, str]) -> Future | None:
        """The masks of the plan's constrained rows, from their grammars' present state, as a future
        filled on the mask thread (None when no row needs one). Rows whose grammar just `ended` get
        none: they finish with this step, and a stopped matcher has no mask to give."""
        rows = [(so, st) for so, st in _constrained(plan, outs) if so.seq.seq_id not in ended]
        return self._filler.submit(self._fill, rows) if rows else None

    def _fill(self, pairs: list) -> TokenMasks:
        """Runs on the filler thread: each shard's rows filled by that shard's thread, into one array;
        then the masks of speculating rows, one per proposal, on this thread."""
        t = time.perf_counter()
        rows = [so for so, st in pairs if not st.spec]
        bits = np.empty((len(rows), self.words), dtype=np.int32)  # every row is written whole
        if self._executors is None:
            self._executors = [llg.LLExecutor(num_threads=1) for _ in range(SHARDS)]
        by_shard: dict[int, list] = {}
        for i, so in enumerate(rows):
            by_shard.setdefault(so.grammar.shard, []).append((so.grammar.m, i))
        ptr, row_bytes, n = bits.ctypes.data, self.words * 4, len(rows)
        jobs = [
            self._shards.submit(self._executors[k].unsafe_compute_mask_ptr, pairs, ptr, row_bytes, n)
            for k, pairs in by_shard.items()
        ]
        for job in jobs:
            job.result()
        spec = {so.seq.seq_id: self._spec_masks(so.grammar.m, st.token_ids[1:]) for so, st in pairs if st.spec}
        if self.metrics is not None:
            self.metrics.profile.masks_s += time.perf_counter() - t
        return TokenMasks([so.seq.seq_id for so in rows], bits, spec)

    def _spec_masks(self, m: llg.LLMatcher, draft: list[int]) -> np.ndarray:
        """A speculating row's masks: row j after the first j proposals. The matcher takes the
        proposals the grammar allows, one by one, and gives them back: verification decides which
        stay (the output processor then advances it by the tokens kept). Rows past a refused proposal,
        or past the grammar's end, are never read: verification stops at the refused one, which its
        row's mask forbids, and the output processor at the end."""
        out = np.full((len(draft) + 1, self.words), -1, dtype=np.int32)
        ptr, row = out.ctypes.data, self.words * 4
        m.unsafe_compute_mask_ptr(ptr, row)
        taken = 0
        for j in range(m.validate_tokens(draft)):
            if not m.consume_token(draft[j]):
                break
            taken += 1
            if m.is_stopped():
                break
            m.unsafe_compute_mask_ptr(ptr + (j + 1) * row, row)
        if taken:
            m.rollback(taken)
        return out

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._filler.shutdown(wait=True)
        self._shards.shutdown(wait=True)


def _constrained(plan: StepPlan, outs: dict) -> list:
    """(SeqOutput, SeqStep) of the plan's live constrained rows that sample, in plan order."""
    rows = []
    for st in plan.seqs:
        if st.sample:
            so = outs.get(st.seq_id)
            if so is not None and so.grammar is not None and not so.seq.finished:
                rows.append((so, st))
    return rows


def _grammar(spec: StructuredOutputs) -> str:
    if spec.json is not None:
        return llg.LLMatcher.grammar_from_json_schema(spec.json, defaults=JSON_DEFAULTS)
    if spec.json_object:
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
    if spec.regex is not None:
        return llg.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    return llg.LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))  # GBNF/EBNF converted; Lark as is


def _first_lines(e, n: int = 6) -> str:
    """llguidance's messages can carry a whole parser state: the first lines say what was wrong."""
    return "\n".join(str(e).strip().splitlines()[:n])[:600]
