#!/usr/bin/env bash
# Device call: kernel-level GQA check, then the engine against transformers for GQA 2 and 4.
set -u
source experiments/device/setup.sh || exit 1
[ -f .fi/cache.tgz ] && tar xzmf .fi/cache.tgz -C .fi
timeout 200 python experiments/device/diag_gqa.py 2>&1 | tee "$OUT/diag.log"
timeout 200 python -m pytest -q -s -m gpu tests/test_gpu.py -k "match_transformers" -p no:cacheprovider \
  2>&1 | grep -v "it/s\]" | tail -30 | tee -a "$OUT/diag.log"
tar czf "$OUT/fi.tgz" --exclude=cache.tgz -C .fi .
