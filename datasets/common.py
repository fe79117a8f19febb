"""Helpers shared by the dataset generators: listing, pairing by name, checks, ``meta.json``.

A generator lists a dataset folder as its archive unpacks, pairs every defect
image with its mask by file name and returns the ``meta.json`` content; the
checks of every file and the atomic write live here.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tabulate import tabulate

from crane.data.dataset import DatasetError
from crane.data.image import ImageReadError, load_rgb

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
RESTORE = "restore it from the dataset archive"

Sample = dict[str, Any]
Meta = dict[str, dict[str, list[Sample]]]


def rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, with forward slashes."""
    return path.relative_to(root).as_posix()


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder`` sorted by name (none when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    """Visible image files directly in ``folder`` sorted by name (none when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def require_dir(folder: Path, root: Path, what: str) -> Path:
    """Return ``folder``, or raise naming it when it is missing."""
    if not folder.is_dir():
        raise DatasetError(f"folder not found: {folder} ({what}); is {root} the folder the dataset archive "
                           "unpacked to?")
    return folder


def stem_index(files: Iterable[Path], root: Path) -> dict[str, Path]:
    """Map each file's lower-case stem to the file; two files with one stem are ambiguous."""
    index: dict[str, Path] = {}
    for path in files:
        key = path.stem.lower()
        if key in index:
            raise DatasetError(f"{rel(index[key], root)} and {rel(path, root)} share the name {path.stem!r}, so the "
                               "image/mask pairing is ambiguous; delete the stray copy")
        index[key] = path
    return index


def find_mask(image: Path, masks: dict[str, Path], suffixes: Sequence[str]) -> Path | None:
    """The mask named ``image stem + suffix`` (first suffix that matches, any image extension)."""
    for suffix in suffixes:
        mask = masks.get((image.stem + suffix).lower())
        if mask is not None:
            return mask
    return None


def missing_mask(image: Path, mask_dir: Path, suffixes: Sequence[str], root: Path) -> DatasetError:
    """The error for a defect image whose mask is not where the layout puts it."""
    expected = " or ".join(rel(mask_dir / f"{image.stem}{s}.png", root) for s in suffixes)
    return DatasetError(f"no mask for defect image {rel(image, root)}: expected {expected} (any image extension); "
                        f"{RESTORE}")


def sample(root: Path, image: Path, mask: Path | None, cls_name: str, specie: str, anomaly: int) -> Sample:
    """One ``meta.json`` entry; paths relative to ``root``."""
    return {
        "img_path": rel(image, root),
        "mask_path": rel(mask, root) if mask is not None else "",
        "cls_name": cls_name,
        "specie_name": specie,
        "anomaly": anomaly,
    }


def build_meta(root: Path, train: Iterable[Sample], test: Iterable[Sample]) -> Meta:
    """Group samples by class (classes and samples sorted); every class must have test samples."""
    meta: Meta = {}
    for split, samples in (("train", train), ("test", test)):
        grouped: dict[str, list[Sample]] = {}
        for s in samples:
            grouped.setdefault(s["cls_name"], []).append(s)
        meta[split] = {c: sorted(grouped[c], key=lambda s: s["img_path"]) for c in sorted(grouped)}
    if not meta["test"]:
        raise DatasetError(f"no test images found under {root}; is it the folder the dataset archive unpacked to?")
    for cls_name in meta["train"]:
        if cls_name not in meta["test"]:
            raise DatasetError(f"class {cls_name!r} has training images but no test images; {RESTORE}")
    return meta


def check_image(path: Path, root: Path) -> None:
    """Raise naming ``path`` unless it is an image file Pillow (or the OpenCV fallback) can read."""
    if not path.is_file():
        raise DatasetError(f"image file not found: {rel(path, root)}; {RESTORE}")
    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, SyntaxError, ValueError) as pil_error:
        try:
            load_rgb(path)
        except ImageReadError:
            raise DatasetError(f"unreadable image {rel(path, root)} ({_reason(pil_error)}); replace it with an "
                               "intact copy from the dataset archive or delete it") from None


def check_mask(path: Path, root: Path) -> None:
    """Raise naming ``path`` unless it is an image file Pillow can read."""
    if not path.is_file():
        raise DatasetError(f"mask file not found: {rel(path, root)}; {RESTORE}")
    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"unreadable mask {rel(path, root)} ({_reason(e)}); replace it with an intact copy "
                           "from the dataset archive") from None


def _reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow recognises"
    return " ".join(str(error).split()) or type(error).__name__


def check_files(root: Path, meta: Meta) -> None:
    """Check that every image and mask listed in ``meta`` exists and opens."""
    for classes in meta.values():
        for samples in classes.values():
            for s in samples:
                check_image(root / s["img_path"], root)
                if s["mask_path"]:
                    check_mask(root / s["mask_path"], root)


def write_meta(root: Path, meta: Meta) -> Path:
    """Write ``root/meta.json`` atomically (temporary file, then ``os.replace``)."""
    target = root / "meta.json"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".meta.", suffix=".json.tmp", dir=root)
    except OSError as e:
        raise DatasetError(f"cannot write {target}: {e.strerror}; make {root} writable") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def count_table(meta: Meta) -> str:
    """Per-class counts: train normal, test normal, test anomalous, test images with masks."""
    rows = []
    for cls_name in sorted(set(meta["train"]) | set(meta["test"])):
        train = meta["train"].get(cls_name, [])
        test = meta["test"].get(cls_name, [])
        rows.append([
            cls_name,
            sum(s["anomaly"] == 0 for s in train),
            sum(s["anomaly"] == 0 for s in test),
            sum(s["anomaly"] == 1 for s in test),
            sum(bool(s["mask_path"]) for s in test),
        ])
    rows.append(["total", *(sum(r[i] for r in rows) for i in range(1, 5))])
    return tabulate(rows, headers=["class", "train normal", "test normal", "test anomalous", "with masks"])
