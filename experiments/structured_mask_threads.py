"""Does filling W11's grammar masks scale with threads or processes on this host? 64 matchers of the W11
schema (nanoslg/bench/structured.py), each placed inside the "name" string (a bounded string, the
slowest state), filled by llguidance's LLExecutor with 1..12 threads, then by 1..8 processes at once.
Each timed fill follows an untimed one over other states of the same grammar, so the lexer's lazily
built automaton is warm, as in a running engine.
    python experiments/structured_mask_threads.py"""

import multiprocessing as mp
import random
import sys
import time

import numpy as np

VOCAB, N = 151936, 64
WORDS = (VOCAB + 31) // 32


def matchers(seed: int, n: int):
    import llguidance as llg
    from llguidance.hf import from_tokenizer
    from transformers import AutoTokenizer

    from nanoslg.bench.structured import SCHEMA
    from nanoslg.engine.structured import JSON_DEFAULTS

    tok = AutoTokenizer.from_pretrained("experiments/tokenizers/qwen3")
    lt = from_tokenizer(tok, n_vocab=VOCAB, eos_token=[tok.eos_token_id])
    base = llg.LLMatcher(lt, llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_DEFAULTS), log_level=0)
    out, rng = [], random.Random(seed)
    for _ in range(2 * n):  # the first n warm the grammar up
        m = base.deep_copy()
        name = "".join(rng.choice("abcdefgxyz ") for _ in range(rng.randrange(1, 20)))
        m.consume_tokens(tok.encode(f'[{{"id":{rng.randrange(1000)},"name":"{name}', add_special_tokens=False))
        out.append(m)
    return out


def fill(ms, threads: int) -> float:
    """Fills the second half of `ms`, after an untimed fill of the first half."""
    import llguidance as llg

    warm, ms = ms[: len(ms) // 2], ms[len(ms) // 2 :]
    bits = np.empty((len(warm), WORDS), dtype=np.int32)
    llg.LLExecutor(num_threads=1).unsafe_compute_mask_ptr(
        [(m, i) for i, m in enumerate(warm)], bits.ctypes.data, WORDS * 4, len(warm)
    )
    bits = np.empty((len(ms), WORDS), dtype=np.int32)
    ex = llg.LLExecutor(num_threads=threads)
    t = time.perf_counter()
    ex.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(ms)], bits.ctypes.data, WORDS * 4, len(ms))
    return time.perf_counter() - t


def proc(args) -> float:
    seed, n = args
    ms = matchers(seed, n)
    barrier.wait()
    return fill(ms, 1)


def init(b) -> None:
    global barrier
    barrier = b


if __name__ == "__main__":
    for threads in (1, 2, 4, 8, 12):
        ms = matchers(threads, N)  # fresh states each time: a state filled before is cached
        print(f"threads {threads:2d}: {N} masks in {fill(ms, threads) * 1e3:.1f} ms")
    for procs in (1, 2, 4, 8):
        b = mp.Barrier(procs)
        with mp.Pool(procs, initializer=init, initargs=(b,)) as pool:
            ts = pool.map(proc, [(100 + p, N // procs) for p in range(procs)])
        print(f"processes {procs}: {N // procs} masks each, slowest {max(ts) * 1e3:.1f} ms")
    sys.stdout.flush()
