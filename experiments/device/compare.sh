#!/usr/bin/env bash
# Device call: the same presets on a baseline tree and on this one, alternately, on one machine, so a
# before/after pair shares its GPU and host. The baseline is a copy of an older commit carried in an
# ignored folder (here: `git archive <commit> | tar x -C .base`, then carry .base):
#   NANOSLG_COMMIT=<this commit> BASE_COMMIT=<old> bash experiments/device/compare.sh .base \
#       "+experiment=offline-qwen3-0.6b" "+experiment=batch1-llama3-8b"
# Logs come back in $OUT/logs.tgz ({base,new}-N.log), this tree's new records in $OUT/records.tgz.
set -u
source experiments/device/setup.sh || exit 1
base=$1
shift
here=$PWD
i=0
for args in "$@"; do
  i=$((i + 1))
  # shellcheck disable=SC2086
  (cd "$base" && NANOSLG_COMMIT=${BASE_COMMIT:-base} PYTHONPATH=$PWD:/tmp/site timeout 170 python run.py $args \
    mode=bench bench.extra.aggregate=false 2>&1 | grep -v "it/s\]" | tee "$OUT/logs/base-$i.log")
  # shellcheck disable=SC2086
  (cd "$here" && timeout 170 python run.py $args mode=bench 2>&1 | grep -v "it/s\]" | tee "$OUT/logs/new-$i.log")
done
save_out
save_fi
