"""Host time of a GEMM the first time its shape is seen, per BLAS library (why model.blas=auto is cuBLAS).

    python experiments/gemm_first_call.py        # on a GPU

Eager prefill steps bring a new token count M almost every step. For Qwen3-0.6B's four weight
shapes and a few M, prints the host time of each first call, then the steady per-call host time and
the wall time of 28 layers' worth of calls. On an H100 (torch 2.11): cuBLASLt took about 4 ms for
most first calls, cuBLAS about 0.25 ms, and both ran the GEMMs equally fast.
"""

import time

import torch
import torch.nn.functional as F

DEV, BF = "cuda", torch.bfloat16
W = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}


def run(lib: str, m: int, weights: dict, inputs: dict) -> None:
    first = {}
    for name, w in weights.items():
        x = inputs.setdefault((m, w.shape[1]), torch.randn(m, w.shape[1], dtype=BF, device=DEV))
        torch.cuda.synchronize()
        t = time.perf_counter()
        F.linear(x, w)
        first[name] = (time.perf_counter() - t) * 1e6
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(28):
        for w in weights.values():
            F.linear(inputs[(m, w.shape[1])], w)
    host = (time.perf_counter() - t) * 1e6 / (28 * len(weights))
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) * 1e3
    print(
        f"{lib:9s} M={m:5d}: first call "
        + " ".join(f"{k} {v:6.0f} us" for k, v in first.items())
        + f" | then {host:5.1f} us/call on the host, {28 * len(weights)} calls {wall:5.1f} ms"
    )


def main() -> None:
    weights = {k: torch.randn(*s, dtype=BF, device=DEV) for k, s in W.items()}
    inputs: dict = {}
    for lib, ms in (("cublaslt", (1072, 8192, 319)), ("cublas", (1111, 7777, 4567))):
        torch.backends.cuda.preferred_blas_library(lib)
        for m in ms:
            run(lib, m, weights, inputs)


if __name__ == "__main__":
    main()
