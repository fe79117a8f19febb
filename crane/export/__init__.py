"""Exporting Crane / Crane+ as one graph for ONNX Runtime and OpenVINO.

* :mod:`crane.export.graph`: :class:`InferenceGraph`, the module that is exported
  (images -> scores, smoothed maps).
* :mod:`crane.export.writer`: ONNX / OpenVINO IR files with their metadata (exporter and opset choice).
* ``python -m crane export`` itself is :mod:`crane.cli.export`.

The exported files are run by :mod:`crane.deploy`, which needs no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"InferenceGraph": "crane.export.graph", "export_graph": "crane.export.writer",
         "default_info": "crane.export.writer", "OPSET": "crane.export.writer"}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crane.export' has no attribute {name!r}")
