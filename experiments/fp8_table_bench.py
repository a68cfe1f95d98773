"""The FP8 skinny kernel's tensor-core tiles chosen and measured in one device call (W10).

fp8_linear runs every step of up to SKINNY_ROWS rows, one row included, with the tensor-core config
`skinny_config(DOT_ROWS, N, K)`: one config for every row count, so that a row's bits do not depend
on the step's row count. Those configs were never swept per shape (SKINNY_TABLE held the one-row FMA
path's only). This sweeps them at one row as fp8_linear runs it (the row quantized in the kernel, K
splits added by the last one) on Llama-3.1-8B's four shapes, puts the fastest per shape into
SKINNY_TABLE for this process only, and runs the batch-1 FP8 preset with them under a bench name of
its own (`batch1-llama3-8b-fp8-swept`), so a record never passes for the checked-in table; then the
FP8 GPU tests run in this process, on the swept table (the same row bits at every row count, the
kernels against the reference, the model checks).

    python experiments/fp8_table_bench.py [sweep budget in seconds, default 120]

Prints the entries to paste into SKINNY_TABLE (keyed (N, K, False): the tensor-core path), and writes
them next to the record (experiments/batch1-llama3-8b-fp8-swept/tables/<record name>.json).
"""

import itertools
import sys
import time

import quant_kernels as qk
import torch

from nanoslg.model.quant.kernels import fp8 as fp8_k

NAME = "batch1-llama3-8b-fp8-swept"


def jobs() -> list:
    """Around the checked-in table's configs: 4 warps won every shape in the twelfth wave; neither
    num_stages 4-6 nor an L2 prefetch of each program's weight slice helped in the thirteenth."""
    out = []
    for bn, bk, splits in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8)):
        out.append(("fp8-one", 1, fp8_k.Skinny(bn, bk, 4, splits, True)))
    return out


def main(budget_s: float) -> None:
    best = qk.compile_and_time(jobs(), time.time(), budget_s)
    table = {}
    for (_, name, _), runs in best.items():
        n, k = qk.SHAPES[name]
        us, cfg = min(runs, key=lambda r: r[0])
        before = qk.timed("fp8-one", n, k, 1)
        now = fp8_k.skinny_config(fp8_k.DOT_ROWS, n, k, torch.device(qk.DEV))
        table[(n, k, False)] = cfg
        gbs = qk.nbytes(n, k, "fp8") / us / 1e3
        print(f"    ({n}, {k}, False): {cfg!r},  # {us:.1f} us, {gbs:.0f} GB/s; now {before:.1f} us, {now}", flush=True)
    fp8_k.SKINNY_TABLE.update(table)
    qk.bench_swept("batch1-llama3-8b-fp8", NAME, table)
    import pytest  # the GPU tests on the swept table: this process's kernels module is theirs

    code = pytest.main(["-q", "-s", "-m", "gpu", "tests/test_gpu_quant.py", "-k", "fp8"])
    print(f"tests on the swept table: exit code {int(code)}")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 120.0)
