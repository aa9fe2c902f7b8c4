#!/usr/bin/env bash
# The one command for the GPU machine (run from the repository root, with .whl carried; see wheels.sh):
#   bash benchmarks/gpu/suite.sh
# Installs the carried wheels and this checkout (built from the working tree, offline: pyproject maps the
# top-level autoencoders/, cli/, configs/ into latentpatch.*, so the bare checkout does not import), then runs
# the suite (python -m benchmarks.gpu.suite: the repository root is on PYTHONPATH) into $OUT (the device tool
# brings $OUT back). Extra arguments go to the suite.
set -uo pipefail
export PIP_NO_INDEX=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site . || exit
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-gpu-suite-out}
mkdir -p "$OUT"
python3 -m benchmarks.gpu.suite --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
