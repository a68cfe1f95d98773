#!/usr/bin/env bash
# One H100 call: GPU tests (FlashInfer vs SDPA, prefix caching), then the single-GPU benchmarks.
# Usage on the device: bash experiments/device/h100_check.sh  (writes logs and records under $OUT)
set -u
source experiments/device/setup.sh || exit 1
python -m pytest -q -x -s -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tar czf "$OUT/fi.tgz" -C .fi .
for exp in "$@"; do
  python run.py mode=bench +experiment="$exp" 2>&1 | grep -v "it/s\]" | tee "$OUT/bench-$exp.log"
done
tar czf "$OUT/records.tgz" experiments/*/records 2>/dev/null
