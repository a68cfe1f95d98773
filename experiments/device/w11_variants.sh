#!/usr/bin/env bash
# Device call: W1 (with the Qwen3 tokenizer) and W11 on this tree and on the three W11 variants of
# experiments/structured-overlap/variants/ (E: one call into llguidance's executor; D: the loop samples;
# D+F: both), each variant built here from this tree and its patch, then run in turn on one machine by
# variants.sh. Carry .whl, .fi and experiments/tokenizers; pass this tree's commit:
#   NANOSLG_COMMIT=<sha> bash experiments/device/w11_variants.sh
set -u
v=experiments/structured-overlap/variants
here=$PWD
# variant DIR PATCH...: a copy of this tree (without its carried wheels and caches) with the patches
# applied; outside the checkout, since git apply inside a repository skips paths outside the folder.
variant() {
  rm -rf "$1" && mkdir -p "$1"
  tar --exclude=./.whl --exclude=./.fi --exclude=./.git -cf - . | tar xf - -C "$1"
  local p
  for p in "${@:2}"; do (cd "$1" && git apply "$here/$v/$p") || return 1; done
}
w=/tmp/w11-variants
variant $w/E E-one-call.diff && variant $w/D D-loop-samples.diff \
  && variant $w/DF D-loop-samples.diff F-loop-samples-one-call-on-top-of-D.diff || exit 1
c=${NANOSLG_COMMIT:-here}
NAMES=".=$c $w/E=$c+E $w/D=$c+D $w/DF=$c+D+F" DEADLINE=${DEADLINE:-300} bash experiments/device/variants.sh \
  ".::+experiment=offline-qwen3-0.6b model.tokenizer=experiments/tokenizers/qwen3" \
  ". $w/E $w/D $w/DF::+experiment=offline-qwen3-0.6b-json" "$w/DF $w/D $w/E .::+experiment=offline-qwen3-0.6b-json"
