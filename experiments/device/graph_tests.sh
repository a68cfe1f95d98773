#!/usr/bin/env bash
# Device call: the CUDA-graph equality test and the decisive FlashInfer-vs-SDPA tests (GQA 2 and 4);
# FlashInfer's JIT cache comes back as $OUT/fi.tgz so later calls skip the compiles.
set -u
source experiments/device/setup.sh || exit 1
[ -f .fi/cache.tgz ] && tar xzmf .fi/cache.tgz -C .fi
timeout 420 python -m pytest -q -s -m gpu tests/test_gpu.py -k "graphs or decisive" -p no:cacheprovider \
  --durations=0 2>&1 | grep -v "it/s\]" | tee "$OUT/gpu_tests.log"
tar czf "$OUT/fi.tgz" --exclude=cache.tgz -C .fi .
