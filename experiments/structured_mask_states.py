"""Which grammar states make W11's masks slow, and whether llguidance's token slices help there.

`states`: 32 matchers of the W11 schema (nanoslg/bench/structured.py) driven by random logits (a
random-weight model's greedy pick), each mask filled alone and timed, grouped by the JSON key being
written and whether the row is inside a string.
`slices`: 64 matchers, one batched fill per step, with llguidance's default slices and with the
engine's (nanoslg/engine/structured.py SLICES: string bodies of 1, 2, ..., 24, 32 characters, narrow
to wide). A first version appended 1-8 character slices after the defaults, where they caught no
token (a token joins the first slice it matches), and measured little.
`coarse`: the engine's slices against sets with exact widths up to 8-12 characters and coarser ones
beyond (fewer slices to check and walk), two rounds.
`procs`: two processes filling 64 rows each at once, against one alone (does the fill scale?).
`xgrammar`: 64 rows placed inside the bounded "name" string, filled by xgrammar (not a dependency:
install it in a separate environment) and by llguidance.
    python experiments/structured_mask_states.py states|slices|coarse|procs|xgrammar [tokenizer dir]"""

import collections
import multiprocessing as mp
import re
import sys
import time

import numpy as np

TOKENIZER = sys.argv[2] if len(sys.argv) > 2 else "experiments/tokenizers/qwen3"
VOCAB = 151936  # Qwen3-0.6B's embedding rows
WORDS = (VOCAB + 31) // 32


def setup(slices=None):
    import llguidance as llg
    from llguidance.hf import from_tokenizer
    from transformers import AutoTokenizer

    from nanoslg.bench.structured import SCHEMA
    from nanoslg.engine.structured import JSON_DEFAULTS

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    lt = from_tokenizer(tok, n_vocab=VOCAB, eos_token=[tok.eos_token_id], slices=slices)
    base = llg.LLMatcher(lt, llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_DEFAULTS), log_level=0)
    return llg, tok, base


def step(ms, bits, rng):
    """Each matcher consumes the argmax of random logits among the tokens its mask allows."""
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :VOCAB].astype(bool)
    picked = []
    for i, m in enumerate(ms):
        logits = rng.standard_normal(VOCAB).astype(np.float32)
        logits[~allowed[i]] = -np.inf
        picked.append(int(np.argmax(logits)))
        m.consume_token(picked[-1])
    return picked


def batched_fill_ms(n: int, steps: int, slices=None, seed: int = 0) -> float:
    llg, _, base = setup(slices)
    ms = [base.deep_copy() for _ in range(n)]
    bits = np.empty((n, WORDS), dtype=np.int32)
    ex, rng, times = llg.LLExecutor(num_threads=1), np.random.default_rng(seed), []
    for _ in range(steps):
        t = time.perf_counter()
        ex.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(ms)], bits.ctypes.data, WORDS * 4, n)
        times.append(time.perf_counter() - t)
        step(ms, bits, rng)
    return float(np.mean(times[steps // 4 :]) * 1e3)  # after the lexer's lazily built states are warm


def state(text: str):
    inside = len(re.findall(r'(?<!\\)"', text)) % 2 == 1
    keys = re.findall(r'"(id|name|tags|price|in_stock)":', text)
    return (keys[-1] if keys else "-", "in a string" if inside else "")


def states(n: int = 32, steps: int = 200) -> None:
    llg, tok, base = setup()
    ms = [base.deep_copy() for _ in range(n)]
    one = np.empty((1, WORDS), dtype=np.int32)
    ex, rng = llg.LLExecutor(num_threads=1), np.random.default_rng(0)
    cost, texts = collections.defaultdict(list), [""] * n
    for s in range(steps):
        for i, m in enumerate(ms):
            t = time.perf_counter()
            ex.unsafe_compute_mask_ptr([(m, 0)], one.ctypes.data, WORDS * 4, 1)
            if s >= 20:
                cost[state(texts[i])].append(time.perf_counter() - t)
            texts[i] += tok.decode(step([m], one, rng))
    total = sum(sum(v) for v in cost.values())
    for k, v in sorted(cost.items(), key=lambda kv: -sum(kv[1])):
        print(f"{k}: {len(v)} masks, mean {np.mean(v) * 1e6:.1f} us, {100 * sum(v) / total:.0f}% of the fill")


def xgrammar_vs_llguidance(n: int = 64) -> None:
    import json
    import random

    import xgrammar as xgr

    from nanoslg.bench.structured import SCHEMA

    llg, tok, base = setup()
    rng, prefixes = random.Random(0), []
    for _ in range(n):
        name = "".join(rng.choice("abcdefgxyz ") for _ in range(rng.randrange(1, 20)))
        prefixes.append(tok.encode(f'[{{"id":{rng.randrange(1000)},"name":"{name}', add_special_tokens=False))
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
    )
    xms = []
    for p in prefixes:
        m = xgr.GrammarMatcher(compiled)
        for t in p:
            m.accept_token(t)
        xms.append(m)
    bitmask = xgr.allocate_token_bitmask(n, VOCAB)
    for rep in range(3):
        t = time.perf_counter()
        for i, m in enumerate(xms):
            m.fill_next_token_bitmask(bitmask, i)
        print(f"xgrammar, fill {rep}: {(time.perf_counter() - t) * 1e3 / n:.3f} ms per mask")
    lms = [base.deep_copy() for _ in prefixes]
    for m, p in zip(lms, prefixes):
        m.consume_tokens(p)
    bits = np.empty((n, WORDS), dtype=np.int32)
    t = time.perf_counter()
    llg.LLExecutor(num_threads=1).unsafe_compute_mask_ptr(
        [(m, i) for i, m in enumerate(lms)], bits.ctypes.data, WORDS * 4, n
    )
    print(f"llguidance, first fill (cold lexer): {(time.perf_counter() - t) * 1e3 / n:.3f} ms per mask")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "states"
    if mode == "states":
        states()
    elif mode == "slices":
        import llguidance as llg

        from nanoslg.engine.structured import SLICES

        general = llg.LLTokenizer.general_slices()
        print(f"llguidance's default slices: {batched_fill_ms(64, 160, general):.2f} ms per 64-row fill")
        print(f"the engine's slices: {batched_fill_ms(64, 160, SLICES):.2f} ms per 64-row fill")
    elif mode == "coarse":  # exact widths up to a point, coarser beyond (fewer slices to check and walk)
        from nanoslg.engine.structured import SLICES

        ws, body, wide = SLICES[0], SLICES[1].split("{")[0], SLICES[-1]
        configs = {
            "the engine's (1..24, 32)": SLICES,
            "1..8, 12, 16, 24, 32": [*range(1, 9), 12, 16, 24, 32],
            "1..10, 14, 18, 24, 32": [*range(1, 11), 14, 18, 24, 32],
            "1..12, 16, 24, 32": [*range(1, 13), 16, 24, 32],
            "1..8, 10, 12, 14, 16, 20, 24, 32": [*range(1, 9), 10, 12, 14, 16, 20, 24, 32],
        }
        for rep in range(2):
            for name, c in configs.items():
                sl = c if isinstance(c[0], str) else [ws, *(f"{body}{{1,{k}}}" for k in c), wide]
                print(f"round {rep + 1}, {name}: {batched_fill_ms(64, 120, sl):.2f} ms per 64-row fill", flush=True)
    elif mode == "xgrammar":
        xgrammar_vs_llguidance()
    elif mode == "procs":
        print(f"one process alone: {batched_fill_ms(64, 120):.2f} ms per 64-row fill")
        with mp.get_context("spawn").Pool(2) as pool:
            both = pool.starmap(batched_fill_ms, [(64, 120, None, 0), (64, 120, None, 1)])
        print("two processes at once: " + ", ".join(f"{x:.2f}" for x in both) + " ms")
