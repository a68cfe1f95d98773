"""The low-precision GEMMs on Llama-3.1-8B's linear shapes: time per call and bytes per second.

    python experiments/quant_kernels.py            # on a GPU: one line per (shape, M), bf16 / fp8 / awq
    python experiments/quant_kernels.py --sweep    # tries tile configs per shape, prints the fastest
    python experiments/quant_kernels.py --small-m  # FP8 at 2..16 rows: _scaled_mm or the skinny kernel
    python experiments/quant_kernels.py --awq-gemv # the AWQ GEMV's variants, then its tiles swept
    python experiments/quant_kernels.py --fused    # FP8 and AWQ, K splits summed after / by the last split

For each of the four linears of a layer (qkv, o, gate_up, down) and M in (1, 8, 16, 64, 512), times the
bf16 GEMM (F.linear), the FP8 path (nanoslg/model/quant/kernels/fp8.py: the skinny kernel up to
SKINNY_ROWS rows, else per-token quantization + torch._scaled_mm) and the AWQ int4 path
(kernels/awq.py), and reports GB/s of weight bytes read: for batch-1 decode (M=1) that is the share
of the bandwidth a kernel reaches, the figure the batch-1 presets depend on.

Timing: the calls are captured in a CUDA graph (decode replays graphs, so host launch overhead is
left out) and rotate over enough copies of the weights to exceed the L2 cache (each decode layer
reads weights it has not read since the last token).

--sweep compiles the candidate configs in parallel processes first (Triton's disk cache then serves
the timing process), times each on the four shapes, and prints the best per (kernel, shape, M) as
table entries for kernels/fp8.py (SKINNY_TABLE) and kernels/awq.py (TABLE).
"""

import itertools
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoslg.model.quant.awq import pack_k
from nanoslg.model.quant.fp8 import fp8_kernel, quantize_weight
from nanoslg.model.quant.kernels import awq as awq_k
from nanoslg.model.quant.kernels import fp8 as fp8_k

DEV, BF = "cuda", torch.bfloat16
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
GROUP = 128
ROTATE_BYTES = 256 << 20  # weight copies per measurement: at least this much, past H100's 50 MB L2
CALLS = 32  # calls per captured graph


def weights(n: int, k: int, kind: str, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    if kind == "bf16":
        return (torch.randn(n, k, device=DEV, dtype=BF, generator=g) * 0.02,)
    if kind == "fp8":
        return quantize_weight(torch.randn(n, k, device=DEV, dtype=BF, generator=g) * 0.02)
    q = torch.randint(0, 16, (k, n), device=DEV, dtype=torch.uint8, generator=g)
    zeros = torch.randint(0, 16, (k // GROUP, n), device=DEV, dtype=torch.uint8, generator=g)
    scales = torch.full((k // GROUP, n), 0.003, device=DEV, dtype=torch.float16)
    return pack_k(q), zeros, scales


def nbytes(n: int, k: int, kind: str) -> int:
    return {"bf16": 2 * n * k, "fp8": n * k + 4 * n, "awq": n * k // 2 + 3 * n * k // GROUP}[kind]


_COPIES: dict = {}


def copies(n: int, k: int, kind: str) -> list:
    kind = kind.removesuffix("-fused").removesuffix("-one")
    key = (n, k, kind)
    if key not in _COPIES:
        count = max(2, math.ceil(ROTATE_BYTES / nbytes(n, k, kind)))
        _COPIES[key] = [weights(n, k, kind, seed) for seed in range(count)]
    return _COPIES[key]


def call(kind: str, x, w, cfg=None):
    if kind == "bf16":
        return F.linear(x, *w)
    if kind == "fp8":
        if isinstance(cfg, tuple) and cfg[0] == "prequant":  # the activations rounded by their own kernel first
            q, s = fp8_k.quantize_rows(x)
            return fp8_k.fp8_skinny(q, *w, None, cfg[1], x_scale=s, out_dtype=x.dtype)
        if cfg is not None:
            return fp8_k.fp8_skinny(x, *w, None, cfg)
        return fp8_k.fp8_linear(x, *w, None, fp8_kernel(w[0]))
    if kind == "awq-fused":  # the K splits summed by the GEMV's last split
        return awq_k.awq_linear(x, *w, GROUP, cfg, counts=_counts(w[0].shape[1]))
    if kind == "fp8-one":  # fp8_linear at one row: the row quantized in the kernel, cfg or its table's
        cfg = cfg or fp8_k.skinny_config(fp8_k.DOT_ROWS, w[0].shape[0], w[0].shape[1], x.device)
        return fp8_k.fp8_skinny(x, *w, None, cfg, counts=_counts(w[0].shape[0], fp8_k), one_row=True)
    if kind == "fp8-fused":  # the skinny kernel's K splits summed by its last split
        return fp8_k.fp8_linear(x, *w, None, fp8_kernel(w[0]), counts=_counts(w[0].shape[0], fp8_k))
    return awq_k.awq_linear(x, *w, GROUP, cfg)


_COUNTS: dict = {}


def _counts(n: int, kernels=awq_k) -> torch.Tensor:
    """One counter buffer per width and method: the calls of a graph run one after another."""
    key = (n, kernels.__name__)
    if key not in _COUNTS:
        _COUNTS[key] = kernels.split_counts(n, DEV)
    return _COUNTS[key]


def timed(kind: str, n: int, k: int, m: int, cfg=None) -> float:
    """Microseconds per call, from a CUDA graph of CALLS calls over rotating weight copies."""
    ws = copies(n, k, kind)
    x = torch.randn(m, k, device=DEV, dtype=BF)
    for w in ws:
        call(kind, x, w, cfg)  # compiles (or loads) the kernels, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            call(kind, x, ws[i % len(ws)], cfg)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return sorted(times)[2] * 1e3 / CALLS


def table() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; CUDA graphs, weights rotated past L2")
    for name, (n, k) in SHAPES.items():
        for m in (1, 8, 16, 64, 512):
            line = []
            for kind in ("bf16", "fp8", "awq"):
                us = timed(kind, n, k, m)
                line.append(f"{kind} {us:7.1f} us {nbytes(n, k, kind) / us / 1e3:6.0f} GB/s")
            print(f"{name:8s} N={n:5d} K={k:5d} M={m:4d}: " + " | ".join(line), flush=True)
        _COPIES.clear()


def candidates() -> list[tuple]:
    """(kind, M, config) to try on every shape, the batch-1 ones first (a budget cut drops the rest)."""
    fma, dot1, awq1, dot16, gemm16, gemm64 = [], [], [], [], [], []
    for bn, bk, warps in itertools.product((8, 16, 32), (256, 512, 1024), (4, 8)):
        if 16 <= bn * bk // (32 * warps) <= 64:  # accumulators per thread: enough loads in flight, no spills
            fma += [("fp8", 1, fp8_k.Skinny(bn, bk, warps, sp, False)) for sp in (1, 2, 4)]
    for bn, bk in itertools.product((16, 32, 64), (128, 256)):
        dot1 += [("fp8", 1, fp8_k.Skinny(bn, bk, 4, sp, True)) for sp in (1, 2, 4)]
    for bn, bk, warps in itertools.product((64, 128, 256), (64, 128), (2, 4, 8)):
        awq1 += [("awq", 1, awq_k.Tiles(bn, bk, warps, -sp)) for sp in (1, 2, 4, 8)]
    for bn, bk, warps in itertools.product((16, 32, 64), (128, 256, 512), (4, 8)):
        dot16 += [("fp8", m, fp8_k.Skinny(bn, bk, warps, sp, True)) for sp in (1, 2, 4) for m in (8, 16)]
    for bn, bk, stages in itertools.product((64, 128), (64, 128), (2, 3, 4)):
        gemm16 += [("awq", m, awq_k.Tiles(bn, bk, 4, -sp, stages)) for sp in (1, 2, 4) for m in (8, 16)]
    for bn, bk, stages in itertools.product((64, 128), (64, 128), (2, 3)):
        gemm64 += [("awq", 64, awq_k.Tiles(bn, bk, 4, -sp, stages)) for sp in (1, 2)]
    return fma + awq1 + dot1 + dot16 + gemm16 + gemm64


def concrete(kind: str, cfg, n: int, k: int, m: int):
    """AWQ candidates name K splits as programs per SM (negative): the splits for this shape."""
    if kind.startswith("awq") and cfg.splits < 0:
        rows = 1 if m == 1 else awq_k.gemm_rows(m)
        programs = -(-n // cfg.block_n) * -(-m // rows)
        return cfg._replace(splits=awq_k.split_k(programs, k // cfg.block_k, torch.device(DEV), -cfg.splits))
    return cfg


def _compile(jobs: list) -> None:
    cache = {}
    for kind, m, cfg in jobs:
        for n, k in SHAPES.values():
            x = torch.randn(m, k, device=DEV, dtype=BF)
            w = cache.setdefault((n, k, kind), weights(n, k, kind))
            try:
                call(kind, x, w, concrete(kind, cfg, n, k, m))
            except Exception:  # out of shared memory or registers: the timing pass reports it
                pass
    torch.cuda.synchronize()


def compile_and_time(jobs: list, t0: float, budget_s: float) -> dict:
    """Compiles the (kind, M, config) jobs in parallel processes (Triton's disk cache then serves this
    one), then times each on the four shapes until the budget is spent: (kind, shape, M) -> [(us, cfg)]."""
    workers = 12
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_compile, [jobs[i::workers] for i in range(workers)])
    print(f"compiled {len(jobs)} candidates in {time.time() - t0:.0f} s", flush=True)
    best: dict = {}
    for kind, m, cfg in jobs:
        if time.time() - t0 > budget_s:
            print(f"budget spent: stopped before {kind} M={m} {cfg}", flush=True)
            break
        for name, (n, k) in SHAPES.items():
            c = concrete(kind, cfg, n, k, m)
            key = (kind, name, m)
            if any(r[1] == c for r in best.get(key, [])):
                continue  # two programs-per-SM settings gave the same splits
            try:
                us = timed(kind, n, k, m, c)
            except Exception as e:
                print(f"  {kind} {name} M={m} {c}: {type(e).__name__}", flush=True)
                continue
            best.setdefault(key, []).append((us, c))
            print(f"  {kind} {name} M={m} {us:.1f} us {c}", flush=True)
    return best


def sweep(budget_s: float) -> None:
    t0 = time.time()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; sweep", flush=True)
    best = compile_and_time(candidates(), t0, budget_s)
    for key, runs in best.items():
        kind, name, m = key
        n, k = SHAPES[name]
        runs = sorted(runs, key=lambda r: r[0])
        ref = timed(kind, n, k, m)  # what the code runs now (its table or default)
        top = " | ".join(f"{us:.1f} us {c}" for us, c in runs[:3])
        gbs = nbytes(n, k, kind) / runs[0][0] / 1e3
        print(f"{kind} {name} N={n} K={k} M={m}: best {gbs:.0f} GB/s; now {ref:.1f} us; {top}", flush=True)
    for name, (n, k) in SHAPES.items():
        for m in (1, 8, 16, 32):  # the FP8 cutover, and fused against separate quantization
            fp8_runs = sorted(best.get(("fp8", name, min(m, 16)), []), key=lambda r: r[0])
            if not fp8_runs:
                continue
            cfg = fp8_runs[0][1]
            x = torch.randn(m, k, device=DEV, dtype=BF)
            scaled = timed_fn(lambda w, x=x: fp8_linear_scaled_mm(x, w), copies(n, k, "fp8"))
            skinny = timed("fp8", n, k, m, cfg)
            pre = timed("fp8", n, k, m, ("prequant", cfg)) if m == 1 else float("nan")
            print(f"fp8 {name} M={m}: skinny {skinny:.1f} us, _scaled_mm {scaled:.1f} us, prequant {pre:.1f} us")
    print(f"sweep done in {time.time() - t0:.0f} s")


def small_m() -> None:
    """FP8 at 2..16 rows: _scaled_mm against the skinny kernel on rows quantize_rows rounded first."""
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; FP8 at few rows", flush=True)
    cfgs = [
        fp8_k.Skinny(bn, bk, w, sp, True)
        for bn, bk, w in ((64, 128, 8), (64, 256, 8), (32, 128, 4))
        for sp in (1, 2, 4)
    ]
    for name, (n, k) in SHAPES.items():
        ws = copies(n, k, "fp8")
        for m in (2, 4, 8, 16):
            x = torch.randn(m, k, device=DEV, dtype=BF)
            scaled = timed_fn(lambda w, x=x: fp8_linear_scaled_mm(x, w), ws)
            now = timed("fp8", n, k, m)
            runs = sorted((timed("fp8", n, k, m, ("prequant", c)), c) for c in cfgs)
            top = " | ".join(f"{us:.1f} us {c}" for us, c in runs[:2])
            print(
                f"fp8 {name} M={m}: _scaled_mm {scaled:.1f} us, fp8_linear {now:.1f} us, prequant skinny {top}",
                flush=True,
            )
        _COPIES.clear()


def awq_gemv_jobs() -> list:
    """The GEMV's candidate tiles, its K splits added by the last split: as before / x loaded per packed
    row (x_vec) / that and the masks as arguments (mask_arg)."""
    jobs = []
    for bn, bk, warps, lean in itertools.product((128, 256, 512), (64, 128), (1, 2, 4), (0, 1, 2)):
        tiles = [awq_k.Tiles(bn, bk, warps, -sp, x_vec=lean >= 1, mask_arg=lean == 2) for sp in (4, 8, 16)]
        jobs += [("awq-fused", 1, t) for t in tiles]
    return jobs


def awq_gemv(budget_s: float) -> None:
    """The AWQ GEMV (one row) on the four shapes, its K splits summed by a kernel of their own (before
    2026-12-06) and by the GEMV's last split, at the table's tiles; then tiles swept with the last
    split summing, x loaded per input or per packed row (x_vec), the mask as an immediate or an argument
    (mask_arg), the best printed as TABLE entries."""
    t0 = time.time()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; AWQ GEMV, M=1", flush=True)
    totals = {"awq": 0.0, "awq-fused": 0.0}
    for name, (n, k) in SHAPES.items():
        t = awq_k.tiles(1, n, k, GROUP, torch.device(DEV))
        line = []
        for kind in totals:
            us = timed(kind, n, k, 1, t)
            totals[kind] += us
            line.append(f"{kind} {us:.1f} us ({nbytes(n, k, 'awq') / us / 1e3:.0f} GB/s)")
        print(f"{name:8s} {t}: " + " | ".join(line), flush=True)
        _COPIES.clear()
    print("a layer's four: " + " | ".join(f"{kind} {us:.1f} us" for kind, us in totals.items()), flush=True)
    for (_, name, _), runs in compile_and_time(awq_gemv_jobs(), t0, budget_s).items():
        n, k = SHAPES[name]
        runs = sorted(runs, key=lambda r: r[0])
        top = " | ".join(f"{us:.1f} us {c}" for us, c in runs[:3])
        print(f"awq {name} N={n} K={k} M=1: best {nbytes(n, k, 'awq') / runs[0][0] / 1e3:.0f} GB/s; {top}", flush=True)
    print(f"awq-gemv done in {time.time() - t0:.0f} s")


def fused() -> None:
    """FP8 and AWQ on the four shapes at the decode row counts, their K splits summed by a kernel of
    their own (before 2026-12-06) and by the last split; a layer's four summed per row count. AWQ at
    one row only: its GEMM (more rows) always sums its splits in a kernel of their own."""
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; K splits summed after / by the last split")
    for kind, rows in (("fp8", (1, 8, 16)), ("awq", (1,))):
        for m in rows:
            totals = [0.0, 0.0]
            for name, (n, k) in SHAPES.items():
                us = [timed(kind, n, k, m), timed(f"{kind}-fused", n, k, m)]
                totals = [a + b for a, b in zip(totals, us)]
                print(f"{kind} {name:8s} M={m:2d}: after {us[0]:.1f} us, by the last split {us[1]:.1f} us", flush=True)
            print(f"{kind} a layer's four, M={m}: {totals[0]:.1f} us / {totals[1]:.1f} us", flush=True)
        _COPIES.clear()


def bench_swept(preset: str, name: str, table: dict) -> Path:
    """Runs the preset in this process (whose kernel tables the caller updated with `table`) under the
    bench name `name`, so its record never passes for the checked-in table's, and writes the table next
    to the record (<name>/tables/<record>.json). Returns that file."""
    from nanoslg.bench.runner import run_bench
    from nanoslg.core.compose import compose_config, setup_logging

    _COPIES.clear()
    torch.cuda.empty_cache()  # the engine sizes its KV pool from the free memory
    setup_logging()
    cfg, node = compose_config([f"+experiment={preset}", f"bench.name={name}", "bench.extra.aggregate=false"])
    record = Path(run_bench(cfg, node)["record"])
    out = record.parent.parent / "tables" / f"{record.stem}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({str(key): t._asdict() for key, t in table.items()}, indent=1))
    print(f"tiles: {out}", flush=True)
    return out


def fp8_linear_scaled_mm(x, w):
    q, s = fp8_k.quantize_rows(x)
    return torch._scaled_mm(q, w[0].t(), scale_a=s, scale_b=w[1].view(1, -1), out_dtype=torch.bfloat16)


def timed_fn(fn, ws) -> float:
    for w in ws:
        fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(ws[i % len(ws)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (3 * CALLS)


if __name__ == "__main__":
    if "--small-m" in sys.argv:
        small_m()
    elif "--fused" in sys.argv:
        fused()
    elif "--awq-gemv" in sys.argv:
        awq_gemv(float(sys.argv[sys.argv.index("--awq-gemv") + 1]) if len(sys.argv) > 2 else 200.0)
    elif "--sweep" in sys.argv:
        sweep(float(sys.argv[sys.argv.index("--sweep") + 1]) if len(sys.argv) > 2 else 150.0)
    else:
        table()
