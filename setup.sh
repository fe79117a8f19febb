#!/usr/bin/env bash
# Create .venv and install crane with its test and deploy extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
else
    echo "[setup] reusing existing .venv ($(.venv/bin/python --version))"
fi
.venv/bin/python -m pip install --quiet --upgrade pip
echo "[setup] installing crane (editable) with the test, deploy, app, anomalib and faiss extras: torch==2.14.1 torchvision==0.29.1 open_clip_torch timm onnxruntime openvino gradio playwright anomalib ..."
.venv/bin/python -m pip install --quiet -e ".[test,deploy,app,anomalib,faiss]"
.venv/bin/python - <<'PY'
import torch, torchvision, open_clip, timm, onnxruntime, openvino, gradio, anomalib, crane
print(f"[setup] ok: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"open_clip {open_clip.__version__}, timm {timm.__version__}, onnxruntime {onnxruntime.__version__}, "
      f"openvino {openvino.__version__}, gradio {gradio.__version__}, anomalib {anomalib.__version__}, "
      f"crane {crane.__version__}")
PY
command -v chromium >/dev/null 2>&1 || echo "[setup] note: the browser tests of the app need Chromium: apt-get install chromium (they skip without it)"
echo "[setup] done. Activate with: source .venv/bin/activate"
