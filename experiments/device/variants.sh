#!/usr/bin/env bash
# Device call: one or more presets, each on several trees in turn (this one, ".", and copies of other
# commits or patched trees carried in ignored folders), ROUNDS times over, all on one machine, so the
# variants of a row share their GPU and host. Each argument is "TREES::ARGS":
#   NAMES=".base=741526f .=c3daad2 .v1=c3daad2+onecall" ROUNDS=2 bash experiments/device/variants.sh \
#       ".base . .v1::+experiment=offline-qwen3-0.6b-json" \
#       ".::+experiment=offline-qwen3-0.6b model.tokenizer=experiments/tokenizers/qwen3"
# NAMES gives each tree the commit its records and logs name. Logs come back in $OUT/logs.tgz
# ({round}-{argument}-{name}.log); this tree's new records in $OUT/records.tgz. No run starts after
# DEADLINE seconds (default 450), so what ran still comes back inside a call's time limit.
set -u
source experiments/device/setup.sh || exit 1
here=$PWD
name_of() {
  local kv
  for kv in ${NAMES:-}; do [ "${kv%%=*}" = "$1" ] && { echo "${kv#*=}"; return; }; done
  echo "${1#.}"
}
for round in $(seq "${ROUNDS:-1}"); do
  i=0
  for arg in "$@"; do
    i=$((i + 1))
    for tree in ${arg%%::*}; do
      [ "$SECONDS" -lt "${DEADLINE:-450}" ] || { echo "== past DEADLINE: skipped $tree ${arg#*::}"; continue; }
      name=$(name_of "$tree")
      log="$OUT/logs/$round-$i-${name:-here}.log"
      extra=""
      [ "$tree" = . ] || extra="bench.extra.aggregate=false"
      # shellcheck disable=SC2086
      (cd "$tree" && NANOSLG_COMMIT=$name PYTHONPATH=$PWD:/tmp/site timeout 170 python run.py ${arg#*::} mode=bench \
        $extra 2>&1 | grep -v "it/s\]" > "$log")
      echo "== round $round, $tree ($name): ${arg#*::}"
      grep -E "throughput|step profile|masks|TTFT |ITL |roofline  |-> |Error|error" "$log" | head -12
    done
  done
done
cd "$here" && save_out && save_fi
