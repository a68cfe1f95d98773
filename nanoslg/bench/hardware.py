"""Hardware figures for the roofline: memory bandwidth and peak FLOP/s of the devices a run uses.

They come from a table of known GPUs (figures below, dense bf16 tensor-core peak), from a
device-to-device copy measured now (`bench.extra.bandwidth=measure`), or from numbers given as
`bench.extra.bandwidth_tbs` / `bench.extra.peak_tflops`. On the CPU both are measured (a memcpy and
an fp32 matmul). With several GPUs the figures scale by their count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from nanoslg.core.errors import ConfigError


@dataclass
class GpuSpec:
    name: str
    bandwidth_spec: float  # bytes/s, datasheet
    bandwidth_copy: float | None  # bytes/s, what a device-to-device copy reaches (when known)
    flops_bf16: float  # dense bf16 tensor-core FLOP/s
    flops_fp32: float


TB, TF = 1e12, 1e12
# (substrings that must all appear in the lower-cased device name, spec); the first match wins.
GPU_TABLE: list[tuple[tuple[str, ...], GpuSpec]] = [
    (("h100", "pcie"), GpuSpec("H100 PCIe", 2.0 * TB, None, 756 * TF, 51 * TF)),
    (("h100", "nvl"), GpuSpec("H100 NVL", 3.9 * TB, None, 835 * TF, 60 * TF)),
    (("h100",), GpuSpec("H100 SXM", 3.35 * TB, 3.0 * TB, 989 * TF, 67 * TF)),
    (("h200",), GpuSpec("H200", 4.8 * TB, None, 989 * TF, 67 * TF)),
    (("a100", "80"), GpuSpec("A100-80G", 2.0 * TB, None, 312 * TF, 19.5 * TF)),
    (("a100",), GpuSpec("A100-40G", 1.555 * TB, None, 312 * TF, 19.5 * TF)),
    (("l40s",), GpuSpec("L40S", 0.864 * TB, None, 362 * TF, 91.6 * TF)),
]


def lookup_gpu(device_name: str) -> GpuSpec | None:
    name = device_name.lower()
    for keys, spec in GPU_TABLE:
        if all(k in name for k in keys):
            return spec
    return None


@dataclass
class Figures:
    bandwidth: float  # bytes/s for all devices together
    peak_flops: float  # FLOP/s for all devices together
    bandwidth_source: str
    flops_source: str
    device_name: str
    num_devices: int = 1

    def describe(self) -> str:
        per = f" x {self.num_devices} devices" if self.num_devices > 1 else ""
        return (
            f"{self.device_name}{per}: {self.bandwidth / self.num_devices / TB:.2f} TB/s "
            f"({self.bandwidth_source}), {self.peak_flops / self.num_devices / TF:.1f} TFLOP/s "
            f"({self.flops_source})"
        )


def measure_bandwidth(device: str = "cuda", nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of a device-to-device copy (each copied byte is read once and written once)."""

    dev = torch.device(device)
    nbytes = nbytes or (256 << 20 if dev.type == "cuda" else 64 << 20)  # far above any L2 cache
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm up
    best = float("inf")
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1000.0
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t0
        best = min(best, dt)
    del src, dst
    return 2 * nbytes / best


def measure_matmul_flops(device: str = "cpu", n: int = 1024, dtype=None, repeats: int = 3) -> float:
    """FLOP/s of a square matmul (the CPU has no table entry)."""

    dtype = dtype or torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def resolve_figures(
    device_type: str,
    device_name: str,
    dtype: str = "bfloat16",
    num_devices: int = 1,
    bandwidth: str = "table",
    bandwidth_tbs: float | None = None,
    peak_tflops: float | None = None,
    device: str | None = None,
) -> Figures:
    """Picks bandwidth and peak FLOP/s: given numbers first, then `bandwidth` (table|spec|measure)."""
    if bandwidth not in ("table", "spec", "measure"):
        raise ConfigError(f"bench.extra.bandwidth={bandwidth!r} is not allowed; allowed: table, spec, measure")
    spec = lookup_gpu(device_name) if device_type == "cuda" else None
    dev = device or device_type
    if bandwidth_tbs:
        bw, bw_src = bandwidth_tbs * TB, "bench.extra.bandwidth_tbs"
    elif device_type != "cuda" or spec is None or bandwidth == "measure":
        bw = measure_bandwidth(dev)
        bw_src = "measured now: device-to-device copy" if device_type == "cuda" else "measured now: memcpy"
    elif bandwidth == "table" and spec.bandwidth_copy:
        bw, bw_src = spec.bandwidth_copy, f"table: {spec.name} measured copy"
    else:
        bw, bw_src = spec.bandwidth_spec, f"table: {spec.name} datasheet"
    if peak_tflops:
        fl, fl_src = peak_tflops * TF, "bench.extra.peak_tflops"
    elif spec is not None:
        fp32 = dtype == "float32"
        fl = spec.flops_fp32 if fp32 else spec.flops_bf16
        fl_src = f"table: {spec.name} dense {'fp32' if fp32 else 'bf16'}"
    else:
        fl, fl_src = measure_matmul_flops(dev), "measured now: fp32 matmul"
    return Figures(bw * num_devices, fl * num_devices, bw_src, fl_src, device_name, num_devices)
