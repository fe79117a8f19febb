"""Decode an image or mask file completely, so that a damaged file is found before any model work.

Pillow's ``verify()`` only checks PNG, and its ``load()`` accepts a PNG whose
final ``IEND`` checksum is cut off, a TIFF whose last directory pointer is
missing and a BMP that lost its last row padding. So the container is checked
first (every PNG chunk with its CRC; every TIFF directory and the tag values,
strips and tiles it points to; the BMP size in its header), then the pixels are
decoded: images as the loader reads them (``crane.data.image.load_rgb``),
masks with Pillow and ``convert("L")`` as ``load_mask`` does. JPEG and BMP
truncation is caught by Pillow's decoder itself (``LOAD_TRUNCATED_IMAGES`` is
never set here).
"""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from crane.data.image import ImageReadError, load_rgb

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIFF_DATA_TAGS = {273: 279, 324: 325}  # StripOffsets -> StripByteCounts, TileOffsets -> TileByteCounts
TIFF_DATA_TAG_SET = frozenset(TIFF_DATA_TAGS) | frozenset(TIFF_DATA_TAGS.values())
TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
TIFF_INTEGER_CODES = {3: "H", 4: "I"}  # SHORT, LONG
MAX_TIFF_DIRECTORIES = 4096


class Damaged(ValueError):
    """A file that does not decode completely; the message says why, in a few words."""


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the warnings Pillow emits on damaged files, which would break the one-line report.

    The warning filters are process-wide: enter this once around all checks (worker
    threads included), not in each thread.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def check_image(path: Path) -> tuple[int, int]:
    """Decode image ``path`` completely as the data loader will; return its ``(width, height)``."""
    data = _read(path)
    _check_container(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size = img.size
            load_rgb(img)
        return size
    except (OSError, SyntaxError, ValueError, ImageReadError) as pil_error:
        if not data.startswith((b"II*\x00", b"MM\x00*")) or _is_truncation(pil_error):
            raise Damaged(_reason(pil_error)) from None
        try:  # a TIFF variant Pillow cannot decode: the loader falls back to OpenCV, so do we
            return _opencv_size(path)
        except ImageReadError:
            raise Damaged(f"{_reason(pil_error)}; OpenCV cannot read it either") from None


def check_mask(path: Path) -> tuple[int, int]:
    """Decode mask ``path`` completely as ``load_mask`` will (Pillow, ``convert("L")``); return its size."""
    data = _read(path)
    _check_container(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img.convert("L")
            return img.size
    except (OSError, SyntaxError, ValueError) as e:
        raise Damaged(_reason(e)) from None


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Damaged(e.strerror or type(e).__name__) from None
    if not data:
        raise Damaged("empty file")
    return data


def _opencv_size(path: Path) -> tuple[int, int]:
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    rgb = load_rgb(path)
    return rgb.shape[1], rgb.shape[0]


def _is_truncation(error: Exception) -> bool:
    return "truncated" in str(error).lower()


def _reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow recognises (wrong format, or cut short)"
    return " ".join(str(error).split()) or type(error).__name__


def _check_container(data: bytes) -> None:
    if data.startswith(PNG_SIGNATURE):
        _check_png(data)
    elif data.startswith(b"BM") and len(data) >= 6 and int.from_bytes(data[2:6], "little") > len(data):
        raise Damaged("truncated: the BMP is shorter than its header says")
    elif data.startswith((b"II*\x00", b"MM\x00*")):
        try:
            _check_tiff(data, "<" if data.startswith(b"II") else ">")
        except struct.error:
            raise Damaged("truncated or corrupt TIFF structure") from None


def _check_png(data: bytes) -> None:
    """Walk the PNG chunks up to ``IEND``, checking that each is complete and its CRC matches."""
    view = memoryview(data)
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise Damaged("truncated: the PNG stops before its IEND chunk")
        length = int.from_bytes(view[pos:pos + 4], "big")
        kind = bytes(view[pos + 4:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise Damaged(f"truncated inside the PNG {kind.decode('latin-1')} chunk")
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            raise Damaged(f"corrupt PNG {kind.decode('latin-1')} chunk (CRC mismatch)")
        if kind == b"IEND":
            return
        pos = end


def _check_tiff(data: bytes, order: str) -> None:
    """Walk the TIFF directories: every directory, tag value, strip and tile must lie inside the file."""
    size = len(data)
    offset = struct.unpack_from(order + "I", data, 4)[0]
    seen: set[int] = set()
    while offset:
        if offset in seen or len(seen) >= MAX_TIFF_DIRECTORIES:
            raise Damaged("corrupt TIFF: its directories form a loop")
        seen.add(offset)
        if offset + 2 > size:
            raise Damaged("truncated: a TIFF directory lies past the end of the file")
        count = struct.unpack_from(order + "H", data, offset)[0]
        end = offset + 2 + 12 * count
        if end + 4 > size:
            raise Damaged("truncated inside a TIFF directory")
        values: dict[int, list[int]] = {}
        for entry in range(offset + 2, end, 12):
            tag, kind, n = struct.unpack_from(order + "HHI", data, entry)
            width = TIFF_TYPE_SIZES.get(kind, 1)
            where = entry + 8 if width * n <= 4 else struct.unpack_from(order + "I", data, entry + 8)[0]
            if where + width * n > size:
                raise Damaged(f"truncated: the values of TIFF tag {tag} lie past the end of the file")
            if kind in TIFF_INTEGER_CODES and tag in TIFF_DATA_TAG_SET:
                values[tag] = list(struct.unpack_from(f"{order}{n}{TIFF_INTEGER_CODES[kind]}", data, where))
        for offsets_tag, counts_tag in TIFF_DATA_TAGS.items():
            starts, lengths = values.get(offsets_tag, []), values.get(counts_tag, [])
            if any(s + n > size for s, n in zip(starts, lengths, strict=False)):
                raise Damaged("truncated: TIFF image data runs past the end of the file")
        offset = struct.unpack_from(order + "I", data, end)[0]
