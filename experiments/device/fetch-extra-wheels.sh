#!/usr/bin/env bash
# Adds to .whl/ the wheels the GPU image lacks beyond ../shared/device/fetch-wheels.sh's: the grammar
# library, Prometheus exposition, and what the GPU tests import (jsonschema, hypothesis, pytest-timeout).
# llguidance's newer wheels are tagged manylinux_2_31, hence that platform tag (the image's glibc is newer).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  "llguidance>=1.7" prometheus_client jsonschema jsonschema-specifications referencing rpds-py attrs \
  hypothesis sortedcontainers pytest-timeout
du -sh .whl
