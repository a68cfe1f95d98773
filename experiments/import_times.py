"""Where a cold start's first seconds go before the config is read (W8): what `python run.py mode=serve`
imports, timed by `python -X importtime` in a fresh interpreter, the largest cumulative entries first,
and the wall time of each heavy import alone.

    python experiments/import_times.py            # on the device: its Python, CUDA torch, FlashInfer
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

SERVE = "import run; import nanoslg.cli, nanoslg.engine.builder, nanoslg.server.serve, nanoslg.runtime.build"


def importtime(code: str) -> list[tuple[int, int, str]]:
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    rows = []
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(2)), len(m.group(3)), m.group(4)))
    return rows


def main() -> None:
    rows = importtime(SERVE)
    top = sorted(rows, reverse=True)[:30]
    print(f"{'cumulative ms':>14}  module (indent = import depth)")
    for us, depth, name in top:
        print(f"{us / 1000:14.1f}  {' ' * (depth // 2)}{name}")
    for mod in ("torch", "transformers", "flashinfer", "triton", "litestar", "hydra", "safetensors"):
        t = time.perf_counter()
        ok = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True).returncode == 0
        print(f"import {mod} alone: {time.perf_counter() - t:.2f} s{'' if ok else ' (failed)'}")


if __name__ == "__main__":
    main()
