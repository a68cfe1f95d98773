"""The output processor's short path for plain sequences (token ids only, one sample, a folding
stream): the same folded result, finish reason and metrics as the full path, which a streamed
reader's request takes; every stop condition ends the sequence where the full path would."""

from __future__ import annotations

import asyncio

import pytest

from nanoslg.core.sampling_params import SamplingParams
from nanoslg.core.sequence import SeqStatus
from nanoslg.engine.metrics import EngineMetrics
from nanoslg.engine.output_processor import OutputProcessor
from nanoslg.engine.stream import RequestStream, collect

EOS = 2
TOKENS = [5, 9, 6, 2, 9, 7, 8, 9, 4, 3, 3, 3]


def run(params: SamplingParams, each_delta: bool, max_model_len: int = 64):
    def finish(seq, reason):
        seq.finish_reason, seq.status = reason, SeqStatus.FINISHED

    proc = OutputProcessor(None, (EOS,), max_model_len, EngineMetrics(), finish)
    stream = RequestStream("r", each_delta)
    seq = proc.add_request("r", None, [11, 12, 13], params, stream).outs[0].seq
    plain = proc.outs[seq.seq_id].plain
    for step, tok in enumerate(TOKENS):
        if seq.finished:
            break
        proc.process([(seq, tok, None)], now=1.0 + 0.01 * step)
    assert seq.finished, "every case ends within TOKENS"
    out = asyncio.run(collect(stream))
    m = proc.metrics
    counts = (m.generation_tokens, m.inter_token_latency.n, m.inter_token_latency.counts, m.time_to_first_token.n)
    counts += (m.request_generation_tokens.counts, m.request_generation_tokens.total, m.time_per_output_token.n)
    return plain, vars(out.outputs[0]), out.finished, counts, stream.timeline


@pytest.mark.parametrize(
    "params,max_model_len",
    [
        (SamplingParams(max_tokens=5, ignore_eos=True), 64),  # length
        (SamplingParams(max_tokens=10), 64),  # EOS at the fourth token
        (SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=[9]), 64),  # at once... 2nd token
        (SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=[9], min_tokens=3), 64),  # the 5th
        (SamplingParams(max_tokens=20, ignore_eos=True), 9),  # the context: 3 prompt + 6
        (SamplingParams(max_tokens=1, ignore_eos=True), 64),  # the first token ends it
    ],
)
def test_the_short_path_gives_the_full_paths_result(params, max_model_len):
    plain, out, done, counts, timeline = run(params, each_delta=False, max_model_len=max_model_len)
    full, want, want_done, want_counts, _ = run(params, each_delta=True, max_model_len=max_model_len)
    assert plain and not full  # the folding reader's request takes the short path, the streamed one not
    assert out == want and done and want_done and counts == want_counts
    assert list(timeline[1]) == [1] * len(want["token_ids"])


def test_what_keeps_a_request_off_the_short_path():
    def plain(params, each_delta=False, grammar=False):
        proc = OutputProcessor(None, (EOS,), 64, EngineMetrics(), lambda seq, reason: None)
        req = proc.add_request("r", None, [11, 12], params, RequestStream("r", each_delta))
        if grammar:
            proc.constrain(req, lambda: object())
        return [so.plain for so in req.outs]

    assert plain(SamplingParams()) == [True]
    assert plain(SamplingParams(), each_delta=True) == [False]
    assert plain(SamplingParams(), grammar=True) == [False]
    assert plain(SamplingParams(logprobs=1)) == plain(SamplingParams(stop=["x"])) == [False]
    assert plain(SamplingParams(n=2)) == [False, False]
