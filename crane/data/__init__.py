"""Data loading: images, masks and the ``meta.json`` datasets.

Imported lazily, so that torch-free tools (``python -m datasets.generate``) can use
:mod:`crane.data.meta`, :mod:`crane.data.image` and :mod:`crane.data.decode` without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "CraneDataset": "crane.data.dataset",
    "DatasetError": "crane.data.meta",
    "ImageInput": "crane.data.image",
    "ImageReadError": "crane.data.image",
    "OPENAI_MEAN": "crane.data.image",
    "OPENAI_STD": "crane.data.image",
    "load_mask": "crane.data.image",
    "load_rgb": "crane.data.image",
    "preprocess": "crane.data.image",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crane.data' has no attribute {name!r}")
