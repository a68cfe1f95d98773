"""How long llguidance takes to fill W11's grammar masks on this host: N matchers of the W11 schema
(nanoslg/bench/structured.py) driven by uniformly drawn allowed tokens (what a random-weight model's
greedy pick amounts to), one batched fill per step, as the engine's mask thread runs it; then one
matcher alone, to show which grammar states are slow.
    python experiments/structured_mask_cost.py [N] [tokenizer dir]"""

import os
import random
import sys
import time

import llguidance as llg
import numpy as np
from llguidance.hf import from_tokenizer
from transformers import AutoTokenizer

from nanoslg.bench.structured import SCHEMA
from nanoslg.engine.structured import JSON_DEFAULTS

n = int(sys.argv[1]) if len(sys.argv) > 1 else 128
tok = AutoTokenizer.from_pretrained(sys.argv[2] if len(sys.argv) > 2 else "experiments/tokenizers/qwen3")
vocab = 151936  # Qwen3-0.6B's embedding rows
words = (vocab + 31) // 32
lt = from_tokenizer(tok, n_vocab=vocab, eos_token=[tok.eos_token_id])
base = llg.LLMatcher(lt, llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_DEFAULTS), log_level=0)
rng = random.Random(0)


def draw(row: np.ndarray) -> int:
    allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab])
    return int(allowed[rng.randrange(len(allowed))])


matchers = [base.deep_copy() for _ in range(n)]
ex, bits, steps = llg.LLExecutor(), np.empty((n, words), dtype=np.int32), []
for _ in range(100):
    t = time.perf_counter()
    ex.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bits.ctypes.data, words * 4, n)
    steps.append(time.perf_counter() - t)
    for i, m in enumerate(matchers):
        m.consume_token(draw(bits[i]))
s = np.array(steps[10:]) * 1e3
stats = f"mean {s.mean():.2f} ms, p50 {np.median(s):.2f}, p90 {np.percentile(s, 90):.2f}"
print(f"{n} rows, {os.cpu_count()} CPUs: batched fill per step {stats}")

m, one, texts = base.deep_copy(), [], []
for _ in range(400):
    t = time.perf_counter()
    m.unsafe_compute_mask_ptr(bits[0].ctypes.data, words * 4)
    one.append((time.perf_counter() - t) * 1e6)
    texts.append(draw(bits[0]))
    m.consume_token(texts[-1])
u = np.array(one)
print(f"one matcher: mean {u.mean():.0f} us, p50 {np.median(u):.0f}, p90 {np.percentile(u, 90):.0f}, max {u.max():.0f}")
slow = [i for i in range(len(u)) if u[i] > 10 * np.median(u)]
print(f"{len(slow)}/{len(u)} masks over 10x the median; their text so far ends with:")
for i in sorted(slow, key=lambda i: -u[i])[:5]:
    print(f"  {u[i]:.0f} us  {tok.decode(texts[max(0, i - 8) : i])!r}")
