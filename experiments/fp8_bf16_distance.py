"""How far transformers' own bf16 run falls from its float32 run on the GPU tests' FP8 model, on the CPU:
the distance the model-level FP8 checks in tests/test_gpu_quant.py are up against.

    python experiments/fp8_bf16_distance.py

The model is test_gpu.py's random bf16 Llama (GQA 4) quantized by tests/quant_ckpt.py's make_fp8
(per-channel weight scales); FP8 activations are rounded per token by a pre-hook, as the engine rounds
them. For each of the tests' three prompts, 32 greedy tokens in bf16, scored teacher-forced by the
float32 model (nats below its argmax, as the tests' `gaps`); the same without FP8 for comparison.
"""

import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from quant_ckpt import fake_quant_act, make_fp8  # noqa: E402
from test_gpu import _bf16_llama  # noqa: E402
from test_gpu_quant import prompts  # noqa: E402  (the GPU tests' three prompts)


def load(path: str, dtype: torch.dtype, fp8_acts: bool):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if fp8_acts:
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                mod.register_forward_pre_hook(lambda _, args: (fake_quant_act(args[0]),))
    return m


@torch.no_grad()
def greedy(m, prompt: list[int], n: int = 32) -> list[int]:
    out = m.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def gaps(m, prompt: list[int], tokens: list[int]) -> list[float]:
    lp = torch.log_softmax(m(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :].float(), -1)
    return (lp.max(-1).values - lp[torch.arange(len(tokens)), torch.tensor(tokens)]).tolist()


def main() -> None:
    root = Path(tempfile.mkdtemp())
    base = _bf16_llama(root, kv_heads=1)
    _, fp8_ref = make_fp8(base, str(root), "fp8", "channel")
    for label, path, fp8 in (("bf16 weights", base, False), ("FP8 weights and activations", fp8_ref, True)):
        ref, half = load(path, torch.float32, fp8), load(path, torch.bfloat16, fp8)
        worst, same = 0.0, 0
        for p in prompts(1):
            tokens = greedy(half, p)
            worst = max(worst, max(gaps(ref, p, tokens)))
            same += sum(a == b for a, b in zip(tokens, greedy(ref, p)))
        print(f"{label}: transformers bf16 against float32, max gap {worst:.3f} nats, {same}/96 tokens equal")


if __name__ == "__main__":
    main()
