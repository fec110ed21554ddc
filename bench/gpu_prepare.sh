#!/usr/bin/env bash
# Collects the wheels bench/gpu.py needs beyond what the GPU machine's image has
# (it has torch, torchvision, open_clip_torch, grpcio, protobuf and
# prometheus_client, and no network). They go to .wheels/ (git-ignored), which
# is carried to the machine; there, run:
#   pip install --no-index --no-deps --find-links .wheels pyyaml grpcio-health-checking grpcio-reflection grpcio-status googleapis-common-protos
#   pip install --no-deps -e . && python -m bench.gpu
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .wheels
for py in 3.10 3.11 3.12 3.13; do
  pip download --quiet --no-deps --only-binary=:all: --python-version "$py" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .wheels pyyaml
done
pip download --quiet --no-deps -d .wheels grpcio-health-checking grpcio-reflection grpcio-status googleapis-common-protos
ls -la .wheels
