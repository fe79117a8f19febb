"""Crane and Crane+ zero-shot anomaly detection.

    import crane
    det = crane.Detector.from_config(clip_weights="openai", checkpoint="checkpoints/trained_on_mvtec_crane/epoch_5.pth",
                                     features_list=(6, 12, 18, 24), soft_mean=True)
    out = det.predict(["part.png"])   # out.scores (N,), out.maps (N, S, S)

The heavy modules (torch models, open_clip) are imported on first use, so tools
such as ``python -m datasets.generate`` start quickly.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Detector": "crane.detector",
    "Prediction": "crane.detector",
    "build_model": "crane.detector",
    "CraneConfig": "crane.models.crane",
    "CraneModel": "crane.models.crane",
    "CheckpointMismatchError": "crane.models.errors",
    "WeightsNotFoundError": "crane.models.errors",
}
__all__ = [*_LAZY, "metrics", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("metrics", "data", "models", "engine"):
        return importlib.import_module(f"crane.{name}")
    raise AttributeError(f"module 'crane' has no attribute {name!r}")
