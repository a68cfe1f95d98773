"""bf16 GEMM time against the step's token count M, at Llama-3.1-8B's four projection shapes (qkv,
o, gate_up, down), and a whole layer's four summed. W7's mixed steps are one 1,024-token prompt plus
a few decode rows (M = 1,025-1,040): does a row count just past a tile multiple cost a wave?

    python experiments/gemm_m_probe.py [M ...]     # on a GPU; each GEMM timed in a CUDA graph
"""

from __future__ import annotations

import sys

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DEFAULT_M = (1000, 1008, 1016, 1024, 1025, 1032, 1040, 1056, 1088, 1152, 1280, 2048, 4096, 8192)


def graph_us(fn, reps: int = 20, inner: int = 10) -> float:
    """us per call: `inner` calls captured in one graph, replayed `reps` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / reps / inner


def main(ms: list[int]) -> None:
    torch.manual_seed(0)
    ws = {k: torch.randn(n, k_, device="cuda", dtype=torch.bfloat16) * 0.02 for k, (n, k_) in SHAPES.items()}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; us per GEMM (TFLOP/s)")
    print(f"{'M':>6} " + " ".join(f"{k:>18}" for k in SHAPES) + f" {'layer':>10} {'x32 ms':>8} {'TFLOP/s':>8}")
    for m in ms:
        row, total, flops = [], 0.0, 0.0
        for w in ws.values():
            x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16)
            us = graph_us(lambda x=x, w=w: torch.nn.functional.linear(x, w))
            f = 2 * m * w.shape[0] * w.shape[1]
            row.append(f"{us:9.1f} ({f / us / 1e6:5.0f})")
            total += us
            flops += f
        cells = " ".join(f"{c:>18}" for c in row)
        print(f"{m:>6} {cells} {total:10.1f} {total * 32 / 1e3:8.2f} {flops / total / 1e6:8.0f}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or list(DEFAULT_M))
