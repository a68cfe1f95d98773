"""The AWQ GEMV's tiles chosen and measured in one device call: sweeps the candidates of
`quant_kernels.py --awq-gemv` on Llama-3.1-8B's four shapes, puts the fastest per shape into
kernels/awq.py's TABLE for this process only, and runs the batch-1 AWQ preset with them under a bench
name of its own (`batch1-llama3-8b-awq-swept`), so a record never passes for the checked-in table.

    python experiments/awq_table_bench.py [sweep budget in seconds, default 150]

Prints the entries to paste into TABLE, and writes them next to the record
(experiments/batch1-llama3-8b-awq-swept/tables/<record name>.json).
"""

import sys
import time

import quant_kernels as qk
import torch

from nanoslg.model.quant.kernels import awq as awq_k

NAME = "batch1-llama3-8b-awq-swept"


def main(budget_s: float) -> None:
    best = qk.compile_and_time(qk.awq_gemv_jobs(), time.time(), budget_s)
    table = {}
    for (_, name, _), runs in best.items():
        n, k = qk.SHAPES[name]
        us, cfg = min(runs, key=lambda r: r[0])
        before = qk.timed("awq-fused", n, k, 1, awq_k.tiles(1, n, k, qk.GROUP, torch.device(qk.DEV)))
        table[(n, k, 1)] = cfg
        print(f"    ({n}, {k}, 1): {cfg!r},  # {us:.1f} us; the checked-in table's {before:.1f} us", flush=True)
    awq_k.TABLE.update(table)
    qk.bench_swept("batch1-llama3-8b-awq", NAME, table)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 150.0)
