#!/usr/bin/env bash
# Prepares .whl/ (git-ignored): the wheels that scripts/gpu_check.sh installs on a lent GPU machine whose
# image lacks them. The image ('cuda', Python 3.12, torch 2.11) has torch, torchvision, timm, numpy, regex,
# tqdm, huggingface-hub, safetensors, scipy, scikit-learn, scikit-image, opencv-python-headless, pillow and
# tabulate, but not open_clip_torch nor ftfy (nor ftfy's wcwidth); nothing can be fetched there.
#
#   bash scripts/gpu_wheels.sh          # then name ".whl" in the device call's carry list
#
# The three wheels are pure Python (py3-none-any, about 2 MiB together). Each is downloaded without its
# dependencies for CPython 3.12 on x86-64 Linux, one pinned version each (two versions of one package in .whl
# would stop the install there).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
    open_clip_torch==3.3.0  # needs torch>=2.0, torchvision, regex, ftfy, tqdm, huggingface-hub, safetensors, timm>=1.0.17
    ftfy==6.3.1             # needs wcwidth
    wcwidth==0.9.5
)
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
ls -1 .whl
du -sh .whl
