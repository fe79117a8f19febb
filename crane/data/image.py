"""Image and mask loading, and the CLIP preprocessing of the published code.

Every entry point accepts a path, a PIL image or an ``H x W x C`` / ``H x W``
numpy array, and returns 8-bit RGB. 16-bit inputs are scaled to 8 bits
(``value >> 8``) instead of being clipped, alpha channels are dropped and
palette / grayscale images are expanded to RGB. ``bit_depth`` names the bits a
16-bit container really holds (12-bit camera data: ``value >> 4``), and an
:class:`InputNotes` passed along counts what was done to unusual inputs
(data in the low bits of a 16-bit file, a multi-page file read on its first
page, an image upscaled to the model size) for one line each per run.

Files are read as stored, as the published code reads datasets. ``predict`` and the
plain-folder calibration ask for ``exif_orientation=True``: the EXIF orientation tag
of a photo (JPEG, TIFF, PNG) is applied, so images are scored as photo viewers show them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
from PIL import Image, ImageOps

from crane.errors import CraneError

if TYPE_CHECKING:  # torch is imported where tensors are made, so image reading stays torch-free
    import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageReadError(CraneError):
    """An image or mask file is missing, truncated or in a format we cannot read."""


BIT_DEPTHS = range(8, 17)
"""Accepted ``bit_depth`` values: the bits a 16-bit container holds (16, the default: ``value >> 8``)."""


@dataclass
class InputNotes:
    """What reading did to unusual inputs during one run: per kind, how many images and the first one.

    Kinds: ``low_bits`` (16-bit data using at most 12 bits, nearly black under ``>> 8``), ``clipped``
    (values above ``bit_depth`` bits, clipped), ``multipage`` (first page read), ``upscaled`` (smaller
    than the model input on a side). :meth:`lines` gives one line per kind seen.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    widest: dict[str, int] = field(default_factory=dict)
    """Per kind, the largest number behind it (bits used, pages, or the model input side)."""

    def add(self, kind: str, where: str, value: int = 0) -> None:
        """Count one image of ``kind``; ``where`` describes it (kept for the first), ``value`` see :attr:`widest`."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.examples.setdefault(kind, where)
        self.widest[kind] = max(self.widest.get(kind, value), value)

    def check_size(self, height: int, width: int, size: int, where: str) -> None:
        """Note an ``height x width`` image that the ``size x size`` model input upscales."""
        if height < size or width < size:
            self.add("upscaled", f"{where} ({width} x {height})", size)

    def lines(self) -> list[str]:
        """One line per kind seen, counted, with an example and what to do about it."""
        out = []
        n, e, w = self.counts, self.examples, self.widest
        if "low_bits" in n:
            bits = max(w["low_bits"], 8)
            out.append(f"{n['low_bits']} 16-bit image(s) use at most {bits} bits (e.g. {e['low_bits']}): read with "
                       f">> 8 they are nearly black; for {bits}-bit data pass --bit_depth {bits}")
        if "clipped" in n:
            out.append(f"{n['clipped']} image(s) hold values above {w['clipped']} bits (e.g. {e['clipped']}), clipped "
                       "to white: check --bit_depth")
        if "multipage" in n:
            out.append(f"{n['multipage']} multi-page file(s) read on their first page only, e.g. {e['multipage']}")
        if "upscaled" in n:
            size = w["upscaled"]
            out.append(f"{n['upscaled']} image(s) smaller than the model input ({size} x {size}) were upscaled to "
                       f"it, e.g. {e['upscaled']}")
        return out


def _to_uint8(arr: np.ndarray, bit_depth: int = 16, notes: Optional[InputNotes] = None, where: str = "") -> np.ndarray:
    """Scale integer/float arrays of any depth to uint8 (16-bit: ``>> (bit_depth - 8)``, default ``>> 8``)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        if arr.dtype.itemsize == 1:
            return arr.astype(np.uint8)
        clipped = np.clip(arr, 0, 65535).astype(np.uint32)
        if notes is not None and clipped.size:
            used = int(clipped.max()).bit_length()
            if bit_depth == 16 and 0 < used <= 12:
                notes.add("low_bits", where, used)
            elif used > bit_depth:
                notes.add("clipped", where, bit_depth)
        top = (1 << bit_depth) - 1
        return (np.minimum(clipped, top) >> (bit_depth - 8)).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if np.nanmax(arr) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale + 0.5, 0, 255).astype(np.uint8)
    raise ImageReadError(f"unsupported array dtype {arr.dtype}")


def _array_to_rgb(arr: np.ndarray, bit_depth: int = 16, notes: Optional[InputNotes] = None,
                  where: str = "") -> np.ndarray:
    arr = _to_uint8(np.asarray(arr), bit_depth, notes, where)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return np.ascontiguousarray(arr[:, :, :3])
    if arr.ndim == 3 and arr.shape[2] == 2:  # gray + alpha
        return np.repeat(arr[:, :, :1], 3, axis=2)
    raise ImageReadError(f"cannot interpret an array of shape {arr.shape} as an image (want HxW, HxWx1, HxWx3 or HxWx4)")


def _pil_to_rgb(img: Image.Image, bit_depth: int = 16, notes: Optional[InputNotes] = None,
                where: str = "") -> np.ndarray:
    if img.mode == "RGB":
        return np.asarray(img)
    if img.mode.startswith("I") or img.mode == "F":
        return _array_to_rgb(np.asarray(img), bit_depth, notes, where)
    if img.mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"))


def _read_file(path: str, exif_orientation: bool = False, bit_depth: int = 16,
               notes: Optional[InputNotes] = None) -> np.ndarray:
    if not os.path.isfile(path):
        raise ImageReadError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            pages = getattr(img, "n_frames", 1)
            if notes is not None and pages > 1:
                notes.add("multipage", f"{path} ({pages} pages)", pages)
            return _pil_to_rgb(ImageOps.exif_transpose(img) if exif_orientation else img, bit_depth, notes, path)
    except (OSError, SyntaxError, ValueError) as pil_error:
        if "truncated" in str(pil_error).lower():  # OpenCV would decode it and fill the missing part with gray
            raise ImageReadError(f"cannot read image {path}: {pil_error}") from None
        import cv2  # OpenCV reads some 16-bit colour TIFFs that Pillow cannot.

        arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ImageReadError(f"cannot read image {path}: {pil_error} (is the file truncated or corrupt?)") from None
        if arr.ndim == 3 and arr.shape[2] >= 3:
            arr = arr[:, :, [2, 1, 0]]
        return _array_to_rgb(arr, bit_depth, notes, path)


def load_rgb(image: ImageInput, exif_orientation: bool = False, bit_depth: int = 16,
             notes: Optional[InputNotes] = None) -> np.ndarray:
    """Return an ``H x W x 3`` uint8 RGB array for a path, PIL image or numpy array.

    ``exif_orientation``: turn a file as its EXIF orientation tag says (as photo viewers show it);
    off by default, which reads files as stored (the published datasets' reading). ``bit_depth``:
    the bits a 16-bit image holds (values above are clipped; 16: ``>> 8``, as by default). ``notes``:
    where to count unusual inputs (see :class:`InputNotes`).
    """
    if bit_depth not in BIT_DEPTHS:
        raise ValueError(f"bit_depth must be 8 to 16, got {bit_depth}")
    where = os.fspath(image) if isinstance(image, (str, os.PathLike)) else "an image"
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, bit_depth, notes, where)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, bit_depth, notes, where)
    if isinstance(image, (str, os.PathLike)):
        return _read_file(where, exif_orientation, bit_depth, notes)
    raise TypeError(f"expected a path, PIL.Image or numpy array, got {type(image).__name__}")


PREPROCESSING = ("crane", "published")
"""``crane``: convert to 8-bit RGB (16-bit scaled, alpha dropped), then resize. ``published``: resize in the
file's own mode, then convert to RGB, as the published transform does (16-bit values saturate, palette
images are resized with nearest, RGBA with alpha-weighted resampling)."""


def preprocess(image: ImageInput, size: int, mode: str = "crane") -> "torch.Tensor":
    """CLIP input of the published code: ``3 x size x size`` float32.

    PIL bicubic (antialiased) resize to ``size x size`` with no crop, ``ToTensor``,
    then normalisation with the OpenAI mean/std. ``mode`` (:data:`PREPROCESSING`) decides
    whether other image modes become RGB before the resize (``crane``) or after it
    (``published``, for files and PIL images; the same for 8-bit RGB and grayscale).
    """
    if mode == "published" and not isinstance(image, np.ndarray):
        rgb = _published_resize(image, size)
    else:
        rgb = Image.fromarray(load_rgb(image), mode="RGB").resize((size, size), Image.BICUBIC)
    import torch

    x = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (x - mean) / std


def _published_resize(image: ImageInput, size: int) -> Image.Image:
    """The published transform's order: PIL resize (bicubic) in the image's own mode, then ``convert("RGB")``."""
    if isinstance(image, Image.Image):
        return image.resize((size, size), Image.BICUBIC).convert("RGB")
    path = os.fspath(image)
    try:
        with Image.open(path) as img:
            img.load()
            return img.resize((size, size), Image.BICUBIC).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from None


def load_mask(mask: ImageInput | None, size: int) -> "torch.Tensor":
    """Ground-truth mask as a ``size x size`` float32 tensor of {0, 1}.

    Binarised as published: ``convert("L") > 0`` (so an RGBA or LA mask is judged by its
    colour, never its alpha, and a colour mask by its luminance); the binary mask is
    resized with PIL bilinear (antialiased) and thresholded at 0.5. ``None`` or ``""``
    gives an all-zero mask. Arrays are taken as the pixel values of an image of that shape.
    """
    import torch

    if mask is None or (isinstance(mask, str) and mask == ""):
        return torch.zeros(size, size)
    if isinstance(mask, (str, os.PathLike)):
        path = os.fspath(mask)
        if not os.path.isfile(path):
            raise ImageReadError(f"mask file not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()
                binary = np.asarray(img.convert("L")) > 0
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageReadError(f"cannot read mask {path}: {e} (is the file truncated or corrupt?)") from None
    elif isinstance(mask, Image.Image):
        binary = np.asarray(mask.convert("L")) > 0
    else:
        arr = np.asarray(mask)
        binary = np.asarray(Image.fromarray(arr).convert("L")) > 0 if arr.dtype == np.uint8 else \
            (arr.max(axis=2) if arr.ndim == 3 else arr) > 0
    resized = Image.fromarray(binary.astype(np.uint8) * 255, mode="L").resize((size, size), Image.BILINEAR)
    return torch.from_numpy((np.asarray(resized).astype(np.float32) / 255.0 > 0.5).astype(np.float32))
