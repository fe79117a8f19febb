"""Images from plain folders, files and globs (no ``meta.json``): what ``predict`` and ``calibrate`` read.

Two listings:

* :func:`collect_inputs` (``predict``): files, folders (searched recursively) and
  globs, in the given order without duplicates, each with an output name.
* :func:`folder_samples` (``calibrate --normal / --labelled``): images labelled by
  their folders: under a folder named ``good`` they are normal, under any other
  folder of a tree that has a ``good`` folder they are defect images (their defect
  type is the folder name), and a tree without a ``good`` folder is all normal
  images. Defect images are paired by name with their masks.

Ground-truth masks are not images to score: a file whose name ends in ``_mask``
(``007_mask.png``) or that lies under a folder named ``masks`` or ``ground_truth``
(the custom and MVTec layouts) is left out of folders and globs (``include_masks``
keeps them); a file named on the command line is always kept.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Optional, Sequence

from crane.errors import CraneError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_FOLDERS = ("masks", "ground_truth")
MASK_SUFFIX = "_mask"
NORMAL_FOLDER = "good"


class InputError(CraneError):
    """An input path, folder or glob is unusable (one-line message)."""


@dataclass(frozen=True)
class InputFile:
    """An image to score: ``path`` as found from the user's input, ``name`` its output name (no suffix)."""

    path: Path
    name: str


@dataclass
class Collected:
    """What :func:`collect_inputs` found: the images to score and the mask files it left out."""

    files: list[InputFile]
    masks_left_out: list[Path] = field(default_factory=list)


def output_name(relative: PurePath) -> str:
    """The name of an image's outputs (``panels/NAME.png``, ``maps/NAME.npy``, ``masks/NAME.png``): its
    path ``relative`` to the folder the outputs mirror, with a ``.png`` suffix (any case) dropped and any
    other suffix kept, so that the name depends on the image alone and two images never share one:
    ``sub/x.png`` -> ``sub/x``, ``sub/x.jpg`` -> ``sub/x.jpg`` (panel ``sub/x.jpg.png``)."""
    relative = PurePath(relative)
    return (relative.with_suffix("") if relative.suffix.lower() == ".png" else relative).as_posix()


def is_image_name(name: str) -> bool:
    """A visible file with an image suffix (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def is_ground_truth(relative: PurePath) -> bool:
    """Whether a file at ``relative`` (inside a searched tree) is a ground-truth mask by its name or folder."""
    folders = {part.lower() for part in relative.parts[:-1]}
    return relative.stem.lower().endswith(MASK_SUFFIX) or any(f in folders for f in MASK_FOLDERS)


def walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden files and folders skipped)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if is_image_name(f)]
    return found


def _glob_base(pattern: str) -> Path:
    """The folder part of ``pattern`` before its first wildcard (what matches are relative to)."""
    parts = Path(pattern).parts
    literal = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        literal.append(part)
    return Path(*literal) if literal else Path(".")


def _names_masks(given: str) -> bool:
    """Whether a folder or glob given on the command line itself points at masks (``gt/masks``, ``*_mask.png``)."""
    parts = [part.lower() for part in Path(given).parts]
    return any(part in MASK_FOLDERS for part in parts) or (bool(parts) and MASK_SUFFIX in parts[-1]
                                                          and any(ch in parts[-1] for ch in "*?["))


def _split_masks(paths: list[Path], base: Path, include_masks: bool) -> tuple[list[Path], list[Path]]:
    if include_masks:
        return paths, []
    keep, masks = [], []
    for path in paths:
        (masks if is_ground_truth(path.relative_to(base)) else keep).append(path)
    return keep, masks


def collect_inputs(inputs: Sequence[str], exclude: Optional[Path] = None, include_masks: bool = False) -> Collected:
    """Expand files, folders and globs into a list of images, in the given order without duplicates.

    Files named explicitly are kept whatever their suffix or name; folders and globs keep
    image suffixes only, and leave out ground-truth masks unless ``include_masks`` (or unless
    the folder or glob itself names them: ``ground_truth/``, ``'**/*_mask.png'``).
    Files inside ``exclude`` (the output folder) are left out. Output names are the paths
    relative to the deepest folder common to all images, named by :func:`output_name`
    (``sub/part.png`` -> ``sub/part``, ``sub/part.jpg`` -> ``sub/part.jpg``).
    Raises :class:`InputError` for an input that is neither a file, a folder nor a matching glob,
    and for two inputs that would share an output name (``a.jpg`` beside ``a.jpg.png``).
    """
    paths: list[Path] = []
    masks: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        asked = include_masks or _names_masks(item)
        if path.is_dir():
            keep, left = _split_masks(walk_images(path), path, asked)
        elif path.is_file():
            keep, left = [path], []
        elif any(ch in item for ch in "*?["):
            pattern = os.path.expanduser(item)
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise InputError(f"no file matches {item!r}")
            base = _glob_base(pattern)
            keep, left = [], []
            for match in map(Path, matches):
                if match.is_dir():
                    k, m = _split_masks(walk_images(match), base, asked)
                elif match.is_file() and is_image_name(match.name):
                    k, m = _split_masks([match], base, asked)
                else:
                    continue
                keep += k
                left += m
        else:
            raise InputError(f"no such file or folder: {item}")
        paths += keep
        masks += left
    excluded = exclude.resolve() if exclude is not None else None
    unique: dict[Path, Path] = {}
    for path in paths:
        resolved = path.resolve()
        if excluded is not None and resolved.is_relative_to(excluded):
            continue
        unique.setdefault(resolved, path)
    kept_masks = [m for m in dict.fromkeys(masks) if excluded is None or not m.resolve().is_relative_to(excluded)]
    if not unique:
        return Collected([], kept_masks)
    common = Path(os.path.commonpath([r.parent for r in unique]))
    files = [InputFile(path, output_name(resolved.relative_to(common))) for resolved, path in unique.items()]
    first: dict[str, Path] = {}
    for item in files:
        other = first.setdefault(item.name, item.path)
        if other != item.path:
            raise InputError(f"{other} and {item.path} would both be named {item.name!r} in the outputs "
                             f"(panels/{item.name}.png); rename one of them")
    return Collected(files, kept_masks)


# --------------------------------------------------------------------------- labelled trees


@dataclass(frozen=True)
class FolderSample:
    """One image of a plain folder: ``anomaly`` 0/1, ``defect`` its folder name (``good`` for normal ones),
    ``mask`` the paired mask file of a defect image (``None`` when it has none)."""

    path: Path
    anomaly: int
    defect: str
    mask: Optional[Path] = None


def _normal_folder(relative: PurePath) -> bool:
    return any(part.lower() == NORMAL_FOLDER for part in relative.parts[:-1])


def _pair_masks(folder: Path, defects: list[tuple[Path, PurePath]], masks: list[Path]) -> dict[Path, Path]:
    """Defect image -> its mask: a mask named ``NAME_mask.*`` or ``NAME.*`` for image ``NAME.*``, preferring
    one under a folder named as the image's defect folder; two equally good candidates are an error."""
    by_stem: dict[str, list[Path]] = {}
    for mask in masks:
        stem = mask.stem.lower()
        by_stem.setdefault(stem[:-len(MASK_SUFFIX)] if stem.endswith(MASK_SUFFIX) else stem, []).append(mask)
    paired: dict[Path, Path] = {}
    owner: dict[Path, Path] = {}
    for image, relative in defects:
        candidates = by_stem.get(image.stem.lower(), [])
        if len(candidates) > 1:
            defect = relative.parts[-2].lower()
            preferred = [m for m in candidates if defect in (p.lower() for p in m.relative_to(folder).parts[:-1])]
            if len(preferred) != 1:
                shown = ", ".join(str(m) for m in candidates[:3])
                raise InputError(f"{image}: several masks match its name ({shown}); keep one, or put each in "
                                 f"masks/DEFECT_TYPE/")
            candidates = preferred
        if candidates:
            if candidates[0] in owner:
                raise InputError(f"mask {candidates[0]} matches both {owner[candidates[0]]} and {image}; move it to "
                                 f"masks/DEFECT_TYPE/")
            owner[candidates[0]] = image
            paired[image] = candidates[0]
    return paired


def folder_samples(folder: Path, labelled: bool = False) -> list[FolderSample]:
    """The images of a plain folder tree, labelled by their folders (see the module docstring).

    A tree without a ``good`` folder is all normal images, unless ``labelled`` (``calibrate
    --labelled``) asks for labels, which is then an error. With ``labelled``, every defect image
    must lie in a folder and is paired with its mask when it has one. A file is one normal image
    (as ``predict`` takes files), but cannot be labelled. Raises :class:`InputError` when the
    folder is missing, holds no images, or does not fit the layout.
    """
    folder = Path(folder).expanduser()
    if folder.is_file():
        if labelled:
            raise InputError(f"{folder} is a file, but labelled images are told apart by their folders: pass the "
                             f"folder holding good/ and the defect folders (such as {folder.parent}), or pass the "
                             "file to --normal if it is a normal image")
        return [FolderSample(folder, 0, NORMAL_FOLDER)]
    if not folder.is_dir():
        raise InputError(f"no such file or folder: {folder}")
    images, masks = _split_masks(walk_images(folder), folder, include_masks=False)
    if not images:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    relative = [(p, p.relative_to(folder)) for p in images]
    if not any(_normal_folder(rel) for _, rel in relative):
        if labelled:
            raise InputError(f"{folder} has no '{NORMAL_FOLDER}' folder, so its images cannot be told apart: put "
                             f"normal images in {folder / NORMAL_FOLDER}/ and defect images in "
                             f"{folder}/DEFECT_TYPE/, or pass it to --normal if every image is normal")
        return [FolderSample(p, 0, NORMAL_FOLDER) for p in images]
    normal = [FolderSample(p, 0, NORMAL_FOLDER) for p, rel in relative if _normal_folder(rel)]
    defects = [(p, rel) for p, rel in relative if not _normal_folder(rel)]
    if not labelled:
        return normal + [FolderSample(p, 1, rel.parts[-2] if len(rel.parts) > 1 else "") for p, rel in defects]
    loose = [p for p, rel in defects if len(rel.parts) == 1]
    if loose:
        raise InputError(f"{loose[0]}: an image outside any folder of a labelled tree; move it to "
                         f"{folder / NORMAL_FOLDER}/ or {folder}/DEFECT_TYPE/")
    paired = _pair_masks(folder, defects, masks)
    return normal + [FolderSample(p, 1, rel.parts[-2], paired.get(p)) for p, rel in defects]
