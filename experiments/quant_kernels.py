"""The low-precision GEMMs on Llama-3.1-8B's linear shapes: time per call and bytes per second.

    python experiments/quant_kernels.py            # on a GPU; prints one line per (kernel, shape, M)

For each of the four linears of a layer (qkv, o, gate_up, down) and M in (1, 8, 64, 512), times the
bf16 GEMM (F.linear), the FP8 path (per-token quantization + torch._scaled_mm, as
nanoslg/model/quant/fp8.py runs it) and the AWQ int4 path (nanoslg/model/quant/kernels/awq.py),
with CUDA events over many calls, and reports GB/s of weight bytes read: for batch-1 decode (M=1)
that is the share of the bandwidth a kernel reaches, the figure the batch-1 presets depend on.
"""

import torch
import torch.nn.functional as F

from nanoslg.model.quant.awq import pack_k
from nanoslg.model.quant.fp8 import fp8_kernel, quantize_weight
from nanoslg.model.quant.kernels.awq import awq_linear
from nanoslg.model.quant.kernels.fp8 import fp8_linear

DEV, BF = "cuda", torch.bfloat16
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
GROUP = 128


def timed(fn, iters: int = 50) -> float:
    """Milliseconds per call, after a warm-up (Triton compiles on the first call)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=DEV, dtype=BF) * 0.02
        wq, ws = quantize_weight(w)
        kernel = fp8_kernel(wq)
        q = torch.randint(0, 16, (k, n), device=DEV, dtype=torch.uint8)
        qw = pack_k(q)
        zeros = torch.randint(0, 16, (k // GROUP, n), device=DEV, dtype=torch.uint8)
        scales = torch.full((k // GROUP, n), 0.003, device=DEV, dtype=torch.float16)
        bytes_ = {"bf16": 2 * n * k, "fp8": n * k + 4 * n, "awq": n * k // 2 + 3 * n * k // GROUP}
        for m in (1, 8, 64, 512):
            x = torch.randn(m, k, device=DEV, dtype=BF)
            runs = {
                "bf16": (F.linear, (x, w)),
                f"fp8 ({kernel})": (fp8_linear, (x, wq, ws, None, kernel)),
                "awq": (awq_linear, (x, qw, zeros, scales, GROUP)),
            }
            line = []
            for label, (fn, args) in runs.items():
                ms = timed(lambda fn=fn, args=args: fn(*args))
                gbs = bytes_[label.split()[0]] / ms / 1e6
                line.append(f"{label} {ms * 1e3:7.1f} us {gbs:6.0f} GB/s")
            print(f"{name:8s} N={n:5d} K={k:5d} M={m:4d}: " + " | ".join(line))


if __name__ == "__main__":
    main()
