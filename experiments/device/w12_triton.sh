#!/usr/bin/env bash
# Device call: the sdpa backend's paged Triton decode (W12). Its GPU tests, then W1 (FlashInfer) and
# W12 (cache=sdpa, the kernel in CUDA graphs) in the same call, then W12 with the gather path for the
# before. Carry .whl and .fi; pass the commit:  NANOSLG_COMMIT=<sha> bash experiments/device/w12_triton.sh
set -u
source experiments/device/setup.sh || exit 1
timeout 200 python -m pytest -q -s -m gpu tests/test_sdpa_triton.py tests/test_sdpa_batched.py \
  tests/test_gpu.py -k "sdpa or triton" 2>&1 | grep -v "it/s\]" > "$OUT/logs/gpu_tests.log"
tail -15 "$OUT/logs/gpu_tests.log"
i=0
for args in "+experiment=offline-qwen3-0.6b" "+experiment=offline-qwen3-0.6b-sdpa cache.sdpa_decode=auto" \
  "+experiment=offline-qwen3-0.6b-sdpa cache.sdpa_decode=gather"; do
  i=$((i + 1))
  [ "$SECONDS" -lt "${DEADLINE:-420}" ] || { echo "== past DEADLINE: skipped $args"; continue; }
  # shellcheck disable=SC2086
  timeout 150 python run.py $args mode=bench 2>&1 | grep -v "it/s\]" > "$OUT/logs/bench-$i.log"
  echo "== $args"
  grep -E "throughput|step profile|roofline  |cache backend|Error|error" "$OUT/logs/bench-$i.log" | head -8
done
save_out
save_fi
