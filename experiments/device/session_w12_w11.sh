#!/usr/bin/env bash
# One device call for two rows: W12 first (the paged Triton decode's GPU tests, W1 and W12 on the same
# machine; records in $OUT/w12-records.tgz), then the W11 variants (w11_variants.sh) in the time left,
# no run starting after END seconds (default 520) into the call. Carry .whl, .fi, experiments/tokenizers:
#   NANOSLG_COMMIT=<sha> bash experiments/device/session_w12_w11.sh
set -u
source experiments/device/setup.sh || exit 1
timeout 150 python -m pytest -q -s -m gpu tests/test_sdpa_triton.py tests/test_sdpa_batched.py 2>&1 \
  | grep -v "it/s\]" > "$OUT/logs/gpu_tests.log"
tail -12 "$OUT/logs/gpu_tests.log"
i=0
for args in "+experiment=offline-qwen3-0.6b" "+experiment=offline-qwen3-0.6b-sdpa cache.sdpa_decode=auto"; do
  i=$((i + 1))
  # shellcheck disable=SC2086
  timeout 120 python run.py $args mode=bench bench.extra.aggregate=false 2>&1 | grep -v "it/s\]" > "$OUT/logs/w12-bench-$i.log"
  echo "== $args"
  grep -E "throughput|step profile|roofline  |cache backend|Error|error" "$OUT/logs/w12-bench-$i.log" | head -8
done
find experiments -path "*/records/*.json" -newer /tmp/nanoslg-run-start -print0 | tar czf "$OUT/w12-records.tgz" --null -T -
DEADLINE=$((${END:-520} - SECONDS)) bash experiments/device/w11_variants.sh
