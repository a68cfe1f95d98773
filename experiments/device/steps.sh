#!/usr/bin/env bash
# Device call: a list of steps run in order, none starting after DEADLINE seconds (default 480):
#   "bench:ARGS"    python run.py ARGS mode=bench          (log: $OUT/logs/N-bench.log)
#   "profile:ARGS"  python experiments/gpu_profile.py ARGS  (log: $OUT/logs/N-profile.log; windows
#                   from NANOSLG_PROFILE_WINDOWS, or "windows=A:B,C:D ARGS" to set them per step)
#   "test:ARGS"     python -m pytest -q -s -m gpu ARGS     (log: $OUT/logs/N-test.log); a bare "test:"
#                   runs the files that hold GPU tests (the server tests import openai, absent there)
#   "host:ARGS"     python experiments/host_profile.py ARGS (log: $OUT/logs/N-host.log)
#   "py:ARGS"       python ARGS                            (log: $OUT/logs/N-py.log)
#   "sh:CMD"        bash -c CMD, e.g. a test on the tree in .before/ (log: $OUT/logs/N-sh.log)
#   "before:ARGS"   the bench on the tree in .before/ (an earlier commit's nanoslg/, conf/ and run.py,
#                   carried; BEFORE_COMMIT names it), its record copied into experiments/ (log: N-before.log)
# Carry .whl and .fi; pass the commit typed out:
#   NANOSLG_COMMIT=<sha> bash experiments/device/steps.sh "bench:+experiment=offline-qwen3-0.6b" ...
set -u
source experiments/device/setup.sh || exit 1
i=0
for step in "$@"; do
  i=$((i + 1))
  kind=${step%%:*} args=${step#*:}
  [ "$SECONDS" -lt "${DEADLINE:-480}" ] || { echo "== past DEADLINE ($SECONDS s): skipped $step"; continue; }
  log="$OUT/logs/$i-$kind.log"
  left=$(( ${DEADLINE:-480} + 100 - SECONDS ))
  case $kind in
    bench) # shellcheck disable=SC2086
      timeout "$left" python run.py $args mode=bench bench.extra.aggregate=false 2>&1 | grep -v "it/s\]" > "$log"
      echo "== $i $step ($SECONDS s)"
      grep -E "throughput|step profile|roofline  |TTFT|ITL|cold start|without -m|Error|error" "$log" | head -10 ;;
    profile)
      win=""
      if [[ $args == windows=* ]]; then win=${args%% *}; win=${win#windows=}; args=${args#* }; fi
      # shellcheck disable=SC2086
      NANOSLG_PROFILE_WINDOWS=${win:-${NANOSLG_PROFILE_WINDOWS:-5:25,300:330}} timeout "$left" \
        python experiments/gpu_profile.py $args 2>&1 | grep -v "it/s\]" > "$log"
      echo "== $i $step ($SECONDS s)"
      sed -n '/^== launches/,$p' "$log" | head -50 ;;
    host) # shellcheck disable=SC2086
      timeout "$left" python experiments/host_profile.py $args 2>&1 | grep -v "it/s\]" > "$log"
      echo "== $i $step ($SECONDS s)"
      grep -v "^\s*$" "$log" | tail -60 ;;
    py) # shellcheck disable=SC2086
      timeout "$left" python $args 2>&1 | grep -v "it/s\]" > "$log"
      echo "== $i $step ($SECONDS s)"
      grep -v "^\s*$" "$log" | tail -40 ;;
    sh)
      timeout "$left" bash -c "$args" 2>&1 | grep -v "it/s\]" > "$log"
      echo "== $i $step ($SECONDS s)"
      grep -v "^\s*$" "$log" | tail -40 ;;
    before) # shellcheck disable=SC2086
      (cd .before && NANOSLG_COMMIT=${BEFORE_COMMIT:-before} PYTHONPATH=$PWD:/tmp/site timeout "$left" python run.py $args mode=bench bench.extra.aggregate=false) \
        2>&1 | grep -v "it/s\]" > "$log"
      (cd .before && find experiments -path "*/records/*.json" -newer /tmp/nanoslg-run-start -exec cp --parents {} .. \;)
      echo "== $i $step ($SECONDS s)"
      grep -E "throughput|step profile|roofline  |TTFT|ITL|Error|error" "$log" | head -10 ;;
    test)
      [ -n "$args" ] || args=$(grep -l "mark.gpu" tests/test_*.py | grep -v "test_server" | tr '\n' ' ')
      # shellcheck disable=SC2086
      timeout "$left" python -m pytest -q -s -m gpu $args 2>&1 | grep -v "it/s\]" > "$log"
      echo "== $i $step ($SECONDS s)"
      tail -8 "$log" ;;
    *) echo "unknown step kind: $kind" ;;
  esac
  # What the call has so far, in case it is cut off before the end (logs stay in place until then).
  tar czf "$OUT/logs-so-far.tgz" -C "$OUT" logs
  save_records
done
rm -f "$OUT/logs-so-far.tgz"
save_out
save_fi
