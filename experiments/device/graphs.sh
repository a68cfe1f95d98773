#!/usr/bin/env bash
# Device call: CUDA-graph tests, then batch1 and offline benchmarks with graphs on.
set -u
source experiments/device/setup.sh || exit 1
tar xzmf .fi/cache.tgz -C .fi
timeout 200 python -m pytest -q -s -m gpu tests/test_gpu.py -k "graphs or decisive" -p no:cacheprovider \
  2>&1 | grep -v "it/s\]" | tee "$OUT/gpu_tests.log"
for args in "+experiment=batch1-llama3-8b" "+experiment=offline-qwen3-0.6b"; do
  timeout 150 python run.py $args 2>&1 | grep -v "it/s\]\|req/s\]" | tee -a "$OUT/bench.log"
done
tar czf "$OUT/records.tgz" experiments/*/records 2>/dev/null
