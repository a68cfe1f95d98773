"""How a W11 mask fill is best spread over threads, with and without a busy Python thread beside it
(the engine's loop processes a step's outputs while the next step's masks fill).

128 matchers of the W11 schema over SHARDS compiles (round-robin, as the engine deals them), driven
by random logits; per step every row's mask is filled two ways, both timed, and the masks compared,
alone, beside a thread running Python without pause, and beside one that runs 1.5 ms of Python and
then sleeps 3 ms (as the loop processes a step's outputs, then awaits the device):
  threads   a Python thread per shard, each calling a one-thread llguidance executor with its rows
            (nanoslg/engine/structured.py Grammars._fill);
  one-call  one call to an llguidance executor of SHARDS threads with every row, grouped by shard
            (the engine at d9296ff, reverted in b0419ad).
    python experiments/structured_fill_modes.py [shards, default 12] [tokenizer dir]"""

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import llguidance as llg
import numpy as np
from llguidance.hf import from_tokenizer
from structured_mask_states import VOCAB, WORDS, step
from transformers import AutoTokenizer

from nanoslg.bench.structured import SCHEMA
from nanoslg.engine.structured import JSON_DEFAULTS, SLICES

SHARDS = int(sys.argv[1]) if len(sys.argv) > 1 else 12
TOKENIZER = sys.argv[2] if len(sys.argv) > 2 else "experiments/tokenizers/qwen3"
ROWS, STEPS = 128, 60


def main() -> None:
    hf = AutoTokenizer.from_pretrained(TOKENIZER)
    ll_tok = from_tokenizer(hf, n_vocab=VOCAB, eos_token=[hf.eos_token_id], slices=SLICES)
    g = llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_DEFAULTS)
    # Each way has compiles of its own: a lexer builds its states lazily, and a fill of the same states
    # right after another on the same compile would find them built.
    ca = [llg.LLMatcher(ll_tok, g, log_level=0) for _ in range(SHARDS)]
    cb = [llg.LLMatcher(ll_tok, g, log_level=0) for _ in range(SHARDS)]
    ms = [(ca[i % SHARDS].deep_copy(), i % SHARDS) for i in range(ROWS)]
    mb = [(cb[i % SHARDS].deep_copy(), i % SHARDS) for i in range(ROWS)]
    one = [llg.LLExecutor(num_threads=1) for _ in range(SHARDS)]
    many = llg.LLExecutor(num_threads=SHARDS)
    pool = ThreadPoolExecutor(max_workers=SHARDS)
    a = np.empty((ROWS, WORDS), dtype=np.int32)
    b = np.empty((ROWS, WORDS), dtype=np.int32)

    def threads() -> None:
        by: dict[int, list] = {}
        for i, (m, k) in enumerate(ms):
            by.setdefault(k, []).append((m, i))
        jobs = [pool.submit(one[k].unsafe_compute_mask_ptr, p, a.ctypes.data, WORDS * 4, ROWS) for k, p in by.items()]
        for j in jobs:
            j.result()

    def one_call() -> None:
        jobs = sorted(((m, i) for i, (m, _) in enumerate(mb)), key=lambda j: mb[j[1]][1])
        many.unsafe_compute_mask_ptr(jobs, b.ctypes.data, WORDS * 4, ROWS)

    stop = threading.Event()

    def busy() -> None:  # the loop thread: pure Python, holding the GIL between its switches
        x = 0
        while not stop.is_set():
            for i in range(2000):
                x += i * i

    def bursty() -> None:  # closer to the engine's loop: 1.5 ms of Python, then 3 ms awaiting the device
        x = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.0015:
                for i in range(200):
                    x += i * i
            time.sleep(0.003)

    rng = np.random.default_rng(0)
    labels = {None: "alone", busy: "beside a busy Python thread", bursty: "beside a bursty Python thread"}
    for beside in (None, busy, bursty):
        if beside:
            stop.clear()
            t_busy = threading.Thread(target=beside, daemon=True)
            t_busy.start()
        times = {"threads": [], "one-call": []}
        for s in range(STEPS):
            for name, fill in (("threads", threads), ("one-call", one_call)):
                t = time.perf_counter()
                fill()
                times[name].append(time.perf_counter() - t)
            if not np.array_equal(a, b):
                raise SystemExit(f"step {s}: the two fills' masks differ")
            for (m, _), t in zip(mb, step([m for m, _ in ms], a, rng)):
                m.consume_token(t)
        if beside:
            stop.set()
            t_busy.join()
        label = labels[beside]
        for name, v in times.items():
            print(
                f"{name:9s} {label}: {np.mean(v[STEPS // 4 :]) * 1e3:.2f} ms per {ROWS}-row fill "
                f"(median {np.median(v[STEPS // 4 :]) * 1e3:.2f})"
            )
    print(f"masks equal in every step; {SHARDS} shards")


if __name__ == "__main__":
    main()
