"""The MVTec AD layout and its relatives: mvtec, mpdd, btad, sdd, dtd, headct, isic.

Per class folder ``C`` (every sub-folder of ROOT that holds a ``test/`` folder)::

    C/train/NORMAL/*              normal training images (optional)
    C/test/NORMAL/*               normal test images
    C/test/DEFECT/*               defect images of type DEFECT
    C/ground_truth/DEFECT/*       their masks: image stem + a suffix of the dataset,
                                  any image extension (or directly in C/ground_truth/)

Per dataset (NORMAL folders; mask name = image stem + the first suffix that exists):

- mvtec, mpdd, dtd (DTD-Synthetic): ``good``; ``NAME_mask.png``.
- btad: ``ok`` (or ``good``), defects in ``ko``; masks share the image stem and
  may change extension (``0000.bmp`` -> ``0000.png``), ``NAME_mask`` also accepted.
- sdd (KolektorSDD after the usual MVTec-style conversion, class
  ``electrical commutators``): ``good``; ``NAME_mask`` or the bare stem
  (conversions differ; assumption).
- headct: ``brain/test/{good,DEFECT}``, image only (no masks read).
- isic: ``skin/test/{good,DEFECT}`` with ``skin/ground_truth/[DEFECT/]`` masks named
  ``NAME_mask``, ``NAME_segmentation`` (the ISIC archive's own name, any case) or the
  bare stem (assumption: the exact unpacked layout varies between conversions).

Normal samples get ``specie_name`` ``good``; defect samples the DEFECT folder name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crane.data.dataset import DatasetError
from datasets.common import (
    Meta,
    Sample,
    build_meta,
    find_mask,
    image_files,
    missing_mask,
    rel,
    sample,
    stem_index,
    subdirs,
)


@dataclass(frozen=True)
class Layout:
    """What varies between MVTec-style datasets."""

    normal: tuple[str, ...] = ("good",)
    mask_suffixes: tuple[str, ...] = ("_mask",)
    """Mask name = image stem + suffix; empty for image-only sets."""


LAYOUTS: dict[str, Layout] = {
    "mvtec": Layout(),
    "mpdd": Layout(),
    "dtd": Layout(),
    "btad": Layout(normal=("ok", "good"), mask_suffixes=("", "_mask")),
    "sdd": Layout(mask_suffixes=("_mask", "")),
    "headct": Layout(mask_suffixes=()),
    "isic": Layout(mask_suffixes=("_mask", "_segmentation", "")),
}


def generate(root: Path, layout: Layout) -> Meta:
    """List an MVTec-style dataset folder; see the module docstring for the layout."""
    class_dirs = [d for d in subdirs(root) if (d / "test").is_dir()]
    if not class_dirs:
        raise DatasetError(f"no class folder with a test/ folder under {root} (expected {root}/CLASS/test/...); "
                           "is it the folder the dataset archive unpacked to?")
    train: list[Sample] = []
    test: list[Sample] = []
    for cls_dir in class_dirs:
        cls_name = cls_dir.name
        for normal in layout.normal:
            train += [sample(root, p, None, cls_name, "good", 0) for p in image_files(cls_dir / "train" / normal)]
        found = len(test)
        for specie_dir in subdirs(cls_dir / "test"):
            if specie_dir.name in layout.normal:
                test += [sample(root, p, None, cls_name, "good", 0) for p in image_files(specie_dir)]
            else:
                test += _defects(root, cls_dir, specie_dir, layout)
        if len(test) == found:
            raise DatasetError(f"no test images in {rel(cls_dir / 'test', root)}/*/; restore the class from the "
                               "dataset archive or delete its folder")
    return build_meta(root, train, test)


def _defects(root: Path, cls_dir: Path, specie_dir: Path, layout: Layout) -> list[Sample]:
    """Defect images of one type, each paired by name with its mask."""
    images = image_files(specie_dir)
    if not layout.mask_suffixes:
        return [sample(root, p, None, cls_dir.name, specie_dir.name, 1) for p in images]
    mask_dir = cls_dir / "ground_truth" / specie_dir.name
    masks = stem_index(image_files(mask_dir), root)
    flat = stem_index(image_files(cls_dir / "ground_truth"), root)
    samples = []
    for image in images:
        mask = find_mask(image, masks, layout.mask_suffixes) or find_mask(image, flat, layout.mask_suffixes)
        if mask is None:
            raise missing_mask(image, mask_dir, layout.mask_suffixes, root)
        samples.append(sample(root, image, mask, cls_dir.name, specie_dir.name, 1))
    return samples
