#!/usr/bin/env bash
# Device call: the one-GPU tests, then the shared-prefix benchmark with prefix caching on and off.
set -u
source experiments/device/setup.sh || exit 1
tar xzmf .fi/cache.tgz -C .fi
timeout 330 python -m pytest -q -s -m gpu tests/test_gpu.py tests/test_paged_cache.py -p no:cacheprovider \
  2>&1 | grep -v "it/s\]" | tee "$OUT/gpu_tests.log"
python run.py -m +experiment=shared-prefix-on-off 2>&1 | grep -v "it/s\]\|req/s\]" | tee "$OUT/bench-prefix.log"
tar czf "$OUT/records.tgz" experiments/*/records experiments/*/results.md 2>/dev/null
