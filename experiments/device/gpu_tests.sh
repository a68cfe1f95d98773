#!/usr/bin/env bash
# Device call: the GPU tests of one GPU (bf16 vs transformers, FlashInfer vs SDPA, prefix caching,
# fused kernels), then FlashInfer's JIT cache comes back as $OUT/fi.tgz for the next call to carry.
set -u
source experiments/device/setup.sh || exit 1
[ -f .fi/cache.tgz ] && tar xzmf .fi/cache.tgz -C .fi
timeout 480 python -m pytest -q -s -m gpu tests/test_gpu.py tests/test_paged_cache.py -p no:cacheprovider \
  2>&1 | grep -v "it/s\]" | tee "$OUT/gpu_tests.log"
tar czf "$OUT/fi.tgz" --exclude=cache.tgz -C .fi .
ls -la "$OUT"
