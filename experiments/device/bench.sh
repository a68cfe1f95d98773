#!/usr/bin/env bash
# Device call: benchmarks given as argument strings, e.g.
#   bash experiments/device/bench.sh "+experiment=offline-qwen3-0.6b" "-m +experiment=shared-prefix-on-off"
# Logs come back in $OUT/logs.tgz (bench-N.log), this run's JSON records in $OUT/records.tgz.
set -u
source experiments/device/setup.sh || exit 1
i=0
for args in "$@"; do
  i=$((i + 1))
  # shellcheck disable=SC2086
  timeout 170 python run.py $args mode=bench 2>&1 | grep -v "it/s\]" | tee "$OUT/logs/bench-$i.log"
done
save_out
save_fi
