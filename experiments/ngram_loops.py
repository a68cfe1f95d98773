"""Does a random-weight model fall into loops that prompt lookup can predict? One greedy request on
a dummy checkpoint (default: the Qwen3-0.6B shape in float32 on this machine's CPU) with
speculative=ngram: where the output first repeats an 8-gram, how many distinct tokens its last 200
hold, and the mean accepted length per verify step.
    python experiments/ngram_loops.py [max_tokens] [overrides...]"""

import random
import sys
import time

from nanoslg import LLM, SamplingParams

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 768
    overrides = sys.argv[2:] or ["model=qwen3-0.6b", "model.load_format=dummy", "model.dtype=float32"]
    llm = LLM(*overrides, "speculative=ngram", "cache.max_num_tokens=4096", "log_level=WARNING")
    rng = random.Random(0)
    prompt = [rng.randrange(3, 100000) for _ in range(128)]
    t = time.time()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    tokens = out.outputs[0].token_ids
    m = llm.engine.metrics
    seen, first = {}, None
    for i in range(len(tokens) - 8):
        key = tuple(tokens[i : i + 8])
        if key in seen:
            first = (i, seen[key])
            break
        seen[key] = i
    print(f"{len(tokens)} tokens in {time.time() - t:.1f} s; first repeated 8-gram at {first}")
    print(f"distinct tokens among the last 200: {len(set(tokens[-200:]))}")
    print(
        f"verify rows {m.spec_num_drafts}, proposed {m.spec_num_draft_tokens}, accepted {m.spec_num_accepted_tokens}, "
        f"mean accepted length {m.spec_mean_accepted_length:.2f}"
    )
    llm.shutdown()
