#!/usr/bin/env bash
# Device call: every one-GPU test (bf16 vs a float32 transformers reference for GQA 2 and 4, both
# backends; CUDA graphs and overlap change no token; fused kernels; dummy-shape FlashInfer vs SDPA;
# prefix caching on/off); the log comes back in $OUT/logs.tgz, FlashInfer's compiled modules as
# $OUT/fi-so.tgz.* (save_fi).
set -u
source experiments/device/setup.sh || exit 1
timeout 450 python -m pytest -q -s -m gpu tests/test_gpu.py tests/test_paged_cache.py -p no:cacheprovider \
  --durations=5 2>&1 | grep -v "it/s\]" | tee "$OUT/logs/gpu_tests.log"
save_out
save_fi
