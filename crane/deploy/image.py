"""Image decoding and the CLIP preprocessing without torch (numpy + Pillow).

The same rules as :func:`crane.data.image.load_rgb` and :func:`crane.data.image.preprocess`,
bit for bit (``tests/test_deploy.py`` checks it): 8-bit RGB out of any input, 16-bit
values scaled with ``>> 8``, alpha dropped, palette and grayscale images expanded;
then a PIL bicubic resize to ``S x S`` (no crop), ``/ 255`` and the OpenAI mean/std.
OpenCV, when installed, reads the few files Pillow cannot (some 16-bit colour TIFFs).
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image

OPENAI_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32).reshape(3, 1, 1)
OPENAI_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32).reshape(3, 1, 1)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageReadError(ValueError):
    """An image file is missing, truncated or in a format we cannot read."""


def _as_uint8(arr: np.ndarray) -> np.ndarray:
    """Any integer, boolean or float array as uint8 (wider integers keep their top 8 of 16 bits)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        if arr.dtype.itemsize == 1:
            return arr.astype(np.uint8)
        return (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if np.nanmax(arr) <= 1.0 else 1.0  # [0, 1] floats are stretched, others taken as 0..255
        return np.clip(np.nan_to_num(arr) * scale + 0.5, 0, 255).astype(np.uint8)
    raise ImageReadError(f"unsupported array dtype {arr.dtype}")


def _rgb_from_array(arr: np.ndarray) -> np.ndarray:
    arr = _as_uint8(np.asarray(arr))
    channels = arr.shape[2] if arr.ndim == 3 else 0
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if channels in (1, 2):  # gray, gray + alpha
        return np.repeat(arr[:, :, :1], 3, axis=2)
    if channels in (3, 4):  # RGB, RGBA
        return np.ascontiguousarray(arr[:, :, :3])
    raise ImageReadError(f"cannot interpret an array of shape {arr.shape} as an image (want HxW, HxWx1, HxWx3 or HxWx4)")


def _rgb_from_pil(img: Image.Image) -> np.ndarray:
    if img.mode == "RGB":
        return np.asarray(img)
    if img.mode == "F" or img.mode.startswith("I"):  # 32-bit and 16-bit modes: scale like arrays
        return _rgb_from_array(np.asarray(img))
    if img.mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"))


def _rgb_from_file(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise ImageReadError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return _rgb_from_pil(img)
    except (OSError, SyntaxError, ValueError) as pil_error:
        if "truncated" in str(pil_error).lower():
            raise ImageReadError(f"cannot read image {path}: {pil_error}") from None
        try:
            import cv2
        except ImportError:
            raise ImageReadError(f"cannot read image {path}: {pil_error} (Pillow cannot decode it; OpenCV, "
                                 "which reads some more formats, is not installed)") from None
        arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ImageReadError(f"cannot read image {path}: {pil_error} (is the file truncated or corrupt?)") from None
        if arr.ndim == 3 and arr.shape[2] >= 3:
            arr = arr[:, :, [2, 1, 0]]  # OpenCV's BGR(A) to RGB
        return _rgb_from_array(arr)


def load_rgb(image: ImageInput) -> np.ndarray:
    """``H x W x 3`` uint8 RGB of a path, PIL image or numpy array."""
    if isinstance(image, Image.Image):
        return _rgb_from_pil(image)
    if isinstance(image, np.ndarray):
        return _rgb_from_array(image)
    if isinstance(image, (str, os.PathLike)):
        return _rgb_from_file(os.fspath(image))
    raise TypeError(f"expected a path, PIL.Image or numpy array, got {type(image).__name__}")


def preprocess(image: ImageInput, size: int) -> np.ndarray:
    """The model input of one image: ``3 x size x size`` float32 (PIL bicubic resize, no crop, OpenAI mean/std)."""
    resized = Image.fromarray(load_rgb(image)).resize((size, size), Image.BICUBIC)
    x = np.asarray(resized).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return (x - OPENAI_MEAN) / OPENAI_STD
