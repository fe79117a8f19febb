"""The CLIP preprocessing without torch (numpy + Pillow).

Decoding is :func:`crane.data.image.load_rgb` itself (torch-free): 8-bit RGB out of any
input, 16-bit values scaled with ``>> 8``, alpha dropped, palette and grayscale images
expanded. :func:`preprocess` then does what :func:`crane.data.image.preprocess` does in its
default ``crane`` mode, bit for bit (``tests/test_deploy.py`` checks it): a PIL bicubic
resize to ``S x S`` (no crop), ``/ 255`` and the OpenAI mean/std, in float32.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from crane.data.image import OPENAI_MEAN, OPENAI_STD, ImageInput, ImageReadError, load_rgb

__all__ = ["ImageInput", "ImageReadError", "load_rgb", "preprocess"]

_MEAN = np.array(OPENAI_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.array(OPENAI_STD, dtype=np.float32).reshape(3, 1, 1)


def preprocess(image: ImageInput, size: int) -> np.ndarray:
    """The model input of one image: ``3 x size x size`` float32 (PIL bicubic resize, no crop, OpenAI mean/std)."""
    resized = Image.fromarray(load_rgb(image)).resize((size, size), Image.BICUBIC)
    x = np.asarray(resized).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return (x - _MEAN) / _STD
