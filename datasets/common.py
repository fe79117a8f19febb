"""Helpers shared by the dataset generators: listing, pairing by name, order, checks, ``meta.json``.

A generator lists a dataset folder as its archive unpacks, pairs every defect
image with its mask by file name and returns a ``Listing``: the ``meta.json``
content in the order the published generator gives (where that order is
deterministic) plus notes for the report. The full decoding of every file and
the atomic write live here too.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate
from tqdm import tqdm

from crane.data.meta import DatasetError
from crane.data.decode import Damaged, check_image, check_mask, quiet

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MARKER = "generated_by"
"""Top-level ``meta.json`` key naming this generator (loaders read only ``train`` and ``test``): a
``meta.json`` without it came from elsewhere (a preprocessed download) and is kept as it is."""
CLUTTER_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})
RESTORE = "restore it from the dataset archive"

Sample = dict[str, Any]
Meta = dict[str, dict[str, list[Sample]]]


@dataclass(frozen=True)
class Request:
    """What the user asked for beyond the dataset folder."""

    classes: tuple[str, ...] | None = None
    """``--classes``: generate only these classes of a set with a fixed class list."""
    split_csv: Path | None = None
    """``--split_csv``: VisA's ``1cls.csv``, to order the ``VisA_pytorch`` form as published."""
    rewrite: bool = False
    """``--rewrite``: list the folders even when a ``meta.json`` from elsewhere is present."""


@dataclass
class Listing:
    """A generator's result: the ``meta.json`` content and what the report should say."""

    meta: Meta
    notes: list[str] = field(default_factory=list)
    accepted: bool = False
    """True when an existing ``meta.json`` was validated and is kept as it is."""
    repair: str = ""
    """For a ``meta.json`` read rather than listed: the other fix, added to errors about its files."""


@dataclass(frozen=True)
class Tree:
    """Where a layout was found: ``base`` inside the dataset folder ``root`` (paths are relative to ``root``)."""

    root: Path
    base: Path

    def rel(self, path: Path) -> str:
        """``path`` relative to the dataset folder, with forward slashes."""
        return path.relative_to(self.root).as_posix()

    def sample(self, image: Path, mask: Path | None, cls_name: str, specie: str, anomaly: int) -> Sample:
        """One ``meta.json`` entry."""
        return {
            "img_path": self.rel(image),
            "mask_path": self.rel(mask) if mask is not None else "",
            "cls_name": cls_name,
            "specie_name": specie,
            "anomaly": anomaly,
        }


@dataclass(frozen=True)
class Layout:
    """One tree a dataset's archive (or a known conversion of it) unpacks to."""

    name: str
    """For the report and for errors, e.g. ``"Kaggle archive: no/, yes/ (and pred/) at the top"``."""
    detect: Callable[[Path], bool]
    """Is this layout at the given folder? Cheap: looks at folder names only."""
    read: Callable[[Tree, Request], Listing]
    """List the layout found in ``Tree.base``: pair, order and check it; raises ``DatasetError``."""


# ---- listing ----------------------------------------------------------------------------------------------------

def is_clutter(path: Path) -> bool:
    """Hidden files and folders (``.DS_Store``, AppleDouble ``._*``), ``Thumbs.db``, ``desktop.ini``, ``__MACOSX``."""
    return path.name.startswith(".") or path.name.lower() in CLUTTER_NAMES


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder`` sorted by name (none when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and not is_clutter(p)), key=lambda p: p.name)


def image_files(folder: Path) -> list[Path]:
    """Visible image files directly in ``folder``, sorted by name as the published generators sort them."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and not is_clutter(p) and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)


def child(folder: Path, name: str) -> Path:
    """``folder/name``, matching the name's case loosely when exactly one entry differs only by case."""
    exact = folder / name
    if exact.exists() or not folder.is_dir():
        return exact
    matches = [p for p in folder.iterdir() if p.name.lower() == name.lower() and not is_clutter(p)]
    return matches[0] if len(matches) == 1 else exact


def locate(folder: Path, name: str) -> Path:
    """``folder/name`` for a relative ``name`` that may contain ``/``, each part's case matched loosely."""
    for part in name.split("/"):
        folder = child(folder, part)
    return folder


def has_dirs(folder: Path, *names: str) -> bool:
    """Whether every ``folder/name`` is a folder (names may contain ``/``; case matched loosely)."""
    return all(locate(folder, name).is_dir() for name in names)


def require_dir(folder: Path, tree: Tree, what: str) -> Path:
    """Return ``folder``, or raise naming it when it is missing."""
    if not folder.is_dir():
        raise DatasetError(f"folder not found: {tree.rel(folder)}/ ({what}); {RESTORE}")
    return folder


def nonempty_images(folder: Path, tree: Tree, what: str) -> list[Path]:
    """The images in ``folder``; an existing folder without images is an error (a hole in the download)."""
    images = image_files(folder)
    if not images:
        raise DatasetError(f"no images in {tree.rel(folder)}/ ({what}); restore them from the dataset archive")
    return images


# ---- pairing by name ----------------------------------------------------------------------------------------------

def stem_index(files: Iterable[Path], tree: Tree) -> dict[str, Path]:
    """Map each file's lower-case stem to the file; two files with one stem are ambiguous."""
    index: dict[str, Path] = {}
    for path in files:
        key = path.stem.lower()
        if key in index:
            raise DatasetError(f"{tree.rel(index[key])} and {tree.rel(path)} share the name {path.stem!r}, so the "
                               "image/mask pairing is ambiguous; delete the stray copy")
        index[key] = path
    return index


def find_mask(image: Path, masks: dict[str, Path], suffixes: Sequence[str]) -> Path | None:
    """The mask named ``image stem + suffix`` (first suffix that matches, any case, any image extension)."""
    for suffix in suffixes:
        mask = masks.get((image.stem + suffix).lower())
        if mask is not None:
            return mask
    return None


def mask_extension(masks: Iterable[Path], default: str) -> str:
    """The extension the masks of a folder really have (the most common one), else the documented one."""
    counts = Counter(p.suffix for p in masks)
    return counts.most_common(1)[0][0] if counts else default


class Pairer:
    """Pairs images with masks by name and remembers which masks were used.

    Mask stem = image stem + one of ``suffixes`` (tried in order, any case, any image
    extension); ``expected(image)`` names the documented mask location for the error
    when a mask is missing.
    """

    def __init__(self, tree: Tree, suffixes: Sequence[str], expected: Callable[[Path], str]) -> None:
        self.tree = tree
        self.suffixes = tuple(suffixes)
        self.expected = expected
        self.indexes: dict[Path, dict[str, Path]] = {}
        self.owner: dict[Path, Path] = {}

    def index(self, folder: Path) -> dict[str, Path]:
        """The masks of ``folder`` by lower-case stem (listed once)."""
        if folder not in self.indexes:
            self.indexes[folder] = stem_index(image_files(folder), self.tree)
        return self.indexes[folder]

    def mask(self, image: Path, folders: Sequence[Path], required: bool = True) -> Path | None:
        """The mask of ``image`` in the first of ``folders`` that has one.

        Raises when it is required and missing, or already taken by another image.
        """
        mask = next((m for folder in folders if (m := find_mask(image, self.index(folder), self.suffixes))), None)
        if mask is None:
            if required:
                raise DatasetError(f"no mask for defect image {self.tree.rel(image)}: expected "
                                   f"{self.expected(image)}; {RESTORE}")
            return None
        if mask in self.owner:
            raise DatasetError(f"mask {self.tree.rel(mask)} matches both {self.tree.rel(self.owner[mask])} and "
                               f"{self.tree.rel(image)}; keep one image of that name per mask")
        self.owner[mask] = image
        return mask

    def check_all_used(self, folders: Iterable[Path], naming: str) -> None:
        """Every mask in ``folders`` must belong to an image: an orphan mask means its image is missing."""
        for folder in folders:
            for mask in self.index(folder).values():
                if mask not in self.owner:
                    raise DatasetError(f"mask {self.tree.rel(mask)} matches no image ({naming}); its image is "
                                       f"missing: {RESTORE}, or delete the mask")


# ---- classes and order ------------------------------------------------------------------------------------------

def wanted_classes(key: str, known: Sequence[str], request: Request) -> list[str]:
    """The classes to generate, in the published order: all of ``known``, or the ``--classes`` subset."""
    if request.classes is None:
        return list(known)
    unknown = [c for c in request.classes if c not in known]
    if unknown:
        raise DatasetError(f"--classes: {key} has no class {unknown[0]!r}; its classes are {' '.join(known)}")
    return [c for c in known if c in request.classes]


def missing_class(key: str, cls_name: str, where: str, request: Request) -> DatasetError:
    """The error for a class of a fixed class list that is absent from the download."""
    subset = "" if request.classes is not None else ", or pass --classes with the classes you have to generate a subset"
    return DatasetError(f"class {cls_name!r} of {key} is missing: expected {where}; restore it from the dataset "
                        f"archive{subset}")


def build_meta(tree: Tree, train: Iterable[Sample], test: Iterable[Sample], classes: Sequence[str]) -> Meta:
    """Group samples by class in the order of ``classes``, keeping each class's samples in the order given.

    Every listed class must have test samples; training images need a test class.
    """
    meta: Meta = {}
    for split, samples in (("train", train), ("test", test)):
        grouped: dict[str, list[Sample]] = {}
        for s in samples:
            grouped.setdefault(s["cls_name"], []).append(s)
        strays = [c for c in grouped if c not in classes]
        if strays:
            raise ValueError(f"samples of unlisted class {strays[0]!r}")  # a generator bug, not a user error
        meta[split] = {c: grouped[c] for c in classes if c in grouped}
    for cls_name in classes:
        if cls_name not in meta["test"]:
            raise DatasetError(f"class {cls_name!r} has no test images under {tree.base}; {RESTORE}")
    return meta


# ---- checks of every file ---------------------------------------------------------------------------------------

def check_files(root: Path, meta: Meta, progress: bool = True) -> list[str]:
    """Decode every image and mask listed in ``meta`` completely; return notes (e.g. size mismatches).

    Raises ``DatasetError`` naming the first bad file in ``meta.json`` order.
    """
    jobs: dict[tuple[str, str], None] = {}
    pairs: list[tuple[str, str]] = []
    for classes in meta.values():
        for samples in classes.values():
            for s in samples:
                jobs[("image", s["img_path"])] = None
                if s["mask_path"]:
                    jobs[("mask", s["mask_path"])] = None
                    pairs.append((s["img_path"], s["mask_path"]))
    order = list(jobs)
    with quiet(), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(tqdm(pool.map(lambda job: _check_one(root, *job), order), total=len(order),
                            desc="decoding images and masks", unit="file", disable=None if progress else True,
                            leave=False))
    sizes: dict[tuple[str, str], tuple[int, int]] = {}
    for job, result in zip(order, results, strict=True):
        if isinstance(result, DatasetError):
            raise result
        sizes[job] = result
    mismatched = [(i, m) for i, m in pairs if sizes[("image", i)] != sizes[("mask", m)]]
    if not mismatched:
        return []
    image, mask_path = mismatched[0]
    (iw, ih), (mw, mh) = sizes[("image", image)], sizes[("mask", mask_path)]
    return [f"{len(mismatched)} mask(s) differ in size from their image (first: {image} is {iw}x{ih}, "
            f"{mask_path} is {mw}x{mh}); masks are resized to the image size when loaded"]


def _check_one(root: Path, kind: str, rel_path: str) -> tuple[int, int] | DatasetError:
    path = root / rel_path
    if not path.is_file():
        return DatasetError(f"{kind} file not found: {rel_path}; {RESTORE}")
    try:
        return check_image(path) if kind == "image" else check_mask(path)
    except Damaged as e:
        return DatasetError(f"unreadable {kind} {rel_path} ({e}); replace it with an intact copy from the dataset "
                            "archive")


# ---- output -----------------------------------------------------------------------------------------------------

def generated_here(path: Path) -> bool:
    """Whether the ``meta.json`` at ``path`` was written by this generator (it carries ``MARKER``)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and str(meta.get(MARKER, "")).startswith("python -m datasets.generate")


def write_meta(root: Path, meta: Meta, key: str) -> Path:
    """Write ``root/meta.json`` atomically (temporary file, then ``os.replace``), marked as generated for ``key``."""
    target = root / "meta.json"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".meta.", suffix=".json.tmp", dir=root)
    except OSError as e:
        raise DatasetError(f"cannot write {target}: {e.strerror}; make {root} writable") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({**meta, MARKER: f"python -m datasets.generate {key}"}, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def count_table(meta: Meta) -> str:
    """Per-class counts in ``meta.json`` order: train normal, test normal, test anomalous, test images with masks."""
    rows = []
    for cls_name in dict.fromkeys([*meta["test"], *meta["train"]]):
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
