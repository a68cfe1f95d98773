"""bf16 GEMM time against the step's token count M, at Llama-3.1-8B's four projection shapes (qkv,
o, gate_up, down; each timed as 32 calls in one CUDA graph) and a step's 32 layers. W7's mixed steps
are one 1,024-token prompt plus a few decode rows (M = 1,025-1,040): does a row count just past a
tile multiple cost a wave?

    python experiments/gemm_m_probe.py [M ...]     # on a GPU
"""

from __future__ import annotations

import sys

import torch
from attn_b1_probe import graph_time  # experiments/ is on the path when a script in it runs

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DEFAULT_M = (1000, 1008, 1016, 1024, 1025, 1032, 1040, 1056, 1088, 1152, 1280, 2048, 4096, 8192)


def main(ms: list[int]) -> None:
    torch.manual_seed(0)
    ws = {k: torch.randn(n, k_, device="cuda", dtype=torch.bfloat16) * 0.02 for k, (n, k_) in SHAPES.items()}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; us per GEMM (TFLOP/s)")
    print(f"{'M':>6} " + " ".join(f"{k:>18}" for k in SHAPES) + f" {'layer':>10} {'x32 ms':>8} {'TFLOP/s':>8}")
    for m in ms:
        row, total, flops = [], 0.0, 0.0
        for w in ws.values():
            x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16)
            us = graph_time(lambda x=x, w=w: torch.nn.functional.linear(x, w))
            f = 2 * m * w.shape[0] * w.shape[1]
            row.append(f"{us:9.1f} ({f / us / 1e6:5.0f})")
            total += us
            flops += f
        cells = " ".join(f"{c:>18}" for c in row)
        print(f"{m:>6} {cells} {total:10.1f} {total * 32 / 1e3:8.2f} {flops / total / 1e6:8.0f}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or list(DEFAULT_M))
