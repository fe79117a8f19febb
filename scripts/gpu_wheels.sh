#!/usr/bin/env bash
# Prepares .whl/ (git-ignored): the wheels that scripts/gpu_check.sh installs, into a temporary folder, on a lent
# GPU machine whose image lacks them. That image ('cuda': Python 3.12, torch 2.11) has torch, torchvision, timm,
# numpy, regex, tqdm, huggingface-hub, safetensors, scipy, scikit-learn, scikit-image, opencv-python-headless,
# pillow and tabulate, but not open_clip_torch, nor ftfy (open_clip's tokenizer) and its wcwidth; and it can
# fetch nothing.
#
#   bash scripts/gpu_wheels.sh [NAME==VERSION ...]     (then name ".whl" in the device call's carry list)
#
# Extra NAME==VERSION arguments carry more (e.g. a newer timm where gpu_check.sh says the image's is too old).
# Each wheel is downloaded without its dependencies for CPython 3.12 on x86-64 Linux (open_clip_torch and ftfy
# are pure Python, wcwidth 0.9.5 is a manylinux abi3 wheel); about 2.4 MiB together. One version of each: two
# versions of one package in .whl/ would stop the install there.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
    open_clip_torch==3.3.0  # needs torch>=2.0, torchvision, regex, ftfy, tqdm, huggingface-hub, safetensors, timm>=1.0.17
    ftfy==6.3.1             # needs wcwidth
    wcwidth==0.9.5
    "$@"
)
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${WHEELS[@]}"
ls -1 .whl
du -sh .whl
