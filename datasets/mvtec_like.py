"""The MVTec AD layout and its relatives (mvtec, mpdd, btad, dtd, the converted sdd, headct and isic
trees, ``VisA_pytorch``, and AdaCLIP's preprocessed folders)::

    CLASS/train/NORMAL/*               normal training images (optional)
    CLASS/test/NORMAL/*                normal test images
    CLASS/test/DEFECT/*                defect images of type DEFECT
    CLASS/ground_truth/DEFECT/*        their masks: image stem + a suffix of the dataset,
                                       any image extension (or directly in CLASS/ground_truth/)

Classes come in the published generator's fixed order; a class of the list
that is missing is an error (``--classes`` generates a subset on purpose).
Within a class, samples are listed defect type by defect type in name order,
each type's images in name order: the order the published generator gives
when its ``os.listdir`` returns folders sorted (it sorts image names itself).
Every defect image needs its mask (paired by name, never by position), every
mask needs its image, and an empty ``test/`` sub-folder is an error.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from crane.data.meta import DatasetError
from datasets.common import (
    Layout,
    Listing,
    Pairer,
    Request,
    Sample,
    Tree,
    build_meta,
    child,
    has_dirs,
    image_files,
    mask_extension,
    missing_class,
    nonempty_images,
    require_dir,
    subdirs,
    wanted_classes,
)


@dataclass(frozen=True)
class Style:
    """What varies between MVTec-style trees."""

    normal: tuple[str, ...] = ("good",)
    """Names of the normal folders under ``train/`` and ``test/`` (any case)."""
    mask_suffixes: tuple[str, ...] = ("_mask",)
    """Mask stem = image stem + suffix, first match wins; empty for image-only sets."""
    mask_ext: str = ".png"
    """The documented mask extension, named in errors when a folder has no mask to show the real one."""
    masks: str = "ground_truth"
    """The mask folder of a class."""
    flat_masks: bool = False
    """Masks are documented directly in the mask folder (not per defect type)."""
    needs_normal: bool = True
    """Every class must have normal test images."""


MVTEC = Style()
BTAD = Style(normal=("ok", "good"), mask_suffixes=("", "_mask"))
DTD = Style(mask_suffixes=("_mask", ""))
SDD = Style(mask_suffixes=("_mask", ""))
IMAGE_ONLY = Style(mask_suffixes=())
ALL_ANOMALOUS = Style(needs_normal=False, mask_suffixes=("_mask", ""))


def fixed_layout(name: str, key: str, classes: Sequence[str], style: Style,
                 folders: Mapping[str, Sequence[str]] | None = None, marks: Sequence[str] = ()) -> Layout:
    """An MVTec-style layout with the fixed class list ``classes`` (published order).

    ``folders`` gives other folder spellings of a class (tried in order after the class
    name); the layout is recognised by a class folder holding ``test/`` and the
    sub-folders ``marks``.
    """
    def names(cls_name: str) -> list[str]:
        return [cls_name, *(folders or {}).get(cls_name, ())]

    def detect(base: Path) -> bool:
        return any(has_dirs(base, f"{folder}/test", *(f"{folder}/{m}" for m in marks))
                   for c in classes for folder in names(c))

    def listing(tree: Tree, request: Request) -> Listing:
        notes: list[str] = []
        wanted = wanted_classes(key, classes, request)
        found: list[tuple[str, Path]] = []
        for cls_name in wanted:
            folder = next((child(tree.base, f) for f in names(cls_name) if has_dirs(tree.base, f"{f}/test")), None)
            if folder is None:
                raise missing_class(key, cls_name, f"{tree.rel(tree.base / cls_name)}/test/", request)
            found.append((cls_name, folder))
        used = {folder for _, folder in found}
        known = {child(tree.base, f) for c in classes for f in names(c)}
        left_out = [d.name for d in subdirs(tree.base) if d in known and d not in used]
        ignored = [d.name for d in subdirs(tree.base) if d not in known]
        if left_out:
            notes.append(f"left out by --classes: {', '.join(left_out)}")
        if ignored:
            notes.append(f"ignored folders that are not {key} classes: {', '.join(f + '/' for f in ignored)}")
        train, test = list_classes(tree, found, style)
        return Listing(build_meta(tree, train, test, wanted), notes)

    return Layout(name, detect, listing)


def list_classes(tree: Tree, classes: Sequence[tuple[str, Path]], style: Style) -> tuple[list[Sample], list[Sample]]:
    """Train and test samples of the class folders ``(class name, folder)``, in the order described above."""
    train: list[Sample] = []
    test: list[Sample] = []
    for cls_name, cls_dir in classes:
        for normal_dir in _normal_dirs(child(cls_dir, "train"), style):
            train += [tree.sample(p, None, cls_name, "good", 0) for p in image_files(normal_dir)]
        test += _test_samples(tree, cls_name, cls_dir, style)
    return train, test


def _normal_dirs(folder: Path, style: Style) -> list[Path]:
    normal = {n.lower() for n in style.normal}
    return [d for d in subdirs(folder) if d.name.lower() in normal]


def _test_samples(tree: Tree, cls_name: str, cls_dir: Path, style: Style) -> list[Sample]:
    test_dir = require_dir(child(cls_dir, "test"), tree, f"test images of {cls_name!r}")
    masks = child(cls_dir, style.masks)
    normal = {n.lower() for n in style.normal}
    pairer = Pairer(tree, style.mask_suffixes, lambda image: _expected_mask(tree, masks, image, style))
    samples: list[Sample] = []
    has_normal = has_defects = False
    for specie_dir in subdirs(test_dir):
        is_normal = specie_dir.name.lower() in normal
        images = nonempty_images(specie_dir, tree, "normal test images" if is_normal else "defect images")
        if is_normal:
            samples += [tree.sample(p, None, cls_name, "good", 0) for p in images]
            has_normal = True
            continue
        has_defects = True
        for image in images:
            mask = pairer.mask(image, [child(masks, specie_dir.name), masks]) if style.mask_suffixes else None
            samples.append(tree.sample(image, mask, cls_name, specie_dir.name, 1))
    loose = image_files(test_dir)
    if loose:
        raise DatasetError(f"{tree.rel(loose[0])} lies directly in {tree.rel(test_dir)}/: test images belong in "
                           f"{tree.rel(test_dir)}/{style.normal[0]}/ or {tree.rel(test_dir)}/DEFECT_TYPE/")
    if not has_defects:
        raise DatasetError(f"no defect images for {cls_name!r}: {tree.rel(test_dir)}/ has no defect folder beside "
                           f"{'/'.join(style.normal)}/; restore them from the dataset archive")
    if style.needs_normal and not has_normal:
        raise DatasetError(f"no normal test images for {cls_name!r}: expected {tree.rel(test_dir)}/"
                           f"{style.normal[0]}/; restore them from the dataset archive")
    if style.mask_suffixes:
        mask_dirs = [d for d in subdirs(masks) if d.name.lower() not in normal]
        for mask_dir in mask_dirs:
            if not child(test_dir, mask_dir.name).is_dir():
                raise DatasetError(f"{tree.rel(mask_dir)}/ holds masks of defect type {mask_dir.name!r} but "
                                   f"{tree.rel(test_dir)}/{mask_dir.name}/ is missing; restore it from the dataset "
                                   "archive")
        pairer.check_all_used([masks, *mask_dirs], f"a mask is named IMAGE_STEM{style.mask_suffixes[0]}")
    return samples


def _expected_mask(tree: Tree, masks: Path, image: Path, style: Style) -> str:
    folder = masks if style.flat_masks else masks / image.parent.name
    ext = mask_extension(image_files(folder) or image_files(masks), style.mask_ext)
    return f"{tree.rel(folder)}/{image.stem}{style.mask_suffixes[0]}{ext} (any image extension)"
