"""Your own data, in the layout of datasets.md "Custom datasets"::

    ROOT/train/CLASS/good/*               normal training images (optional)
    ROOT/test/CLASS/good/*                normal test images
    ROOT/test/CLASS/DEFECT_TYPE/*         defect images
    ROOT/test/CLASS/masks/NAME_mask.*     mask of test/CLASS/DEFECT_TYPE/NAME.* (optional)

A mask may also sit in ``masks/DEFECT_TYPE/NAME_mask.*`` (looked up first), which
keeps names unique when two defect types hold images of the same name. A defect
image without a mask is kept with an empty ``mask_path`` (it counts for image
metrics only). Every file under ``masks/`` must be the mask of a defect image of
its class, which catches misspelt mask names. Images: PNG, JPEG, BMP, TIFF.
"""
from __future__ import annotations

from pathlib import Path

from crane.data.dataset import DatasetError
from datasets.common import (
    Meta,
    Sample,
    build_meta,
    find_mask,
    image_files,
    rel,
    require_dir,
    sample,
    stem_index,
    subdirs,
)

NORMAL = "good"
MASKS = "masks"
SUFFIX = "_mask"


def generate(root: Path) -> Meta:
    """List a custom dataset folder; see the module docstring for the layout."""
    class_dirs = subdirs(require_dir(root / "test", root, "test images, as test/CLASS/good/ and test/CLASS/DEFECT/"))
    if not class_dirs:
        raise DatasetError(f"no class folders in {root / 'test'}; put test images in test/CLASS/good/ and "
                           "test/CLASS/DEFECT_TYPE/")
    for train_dir in subdirs(root / "train"):
        if not (root / "test" / train_dir.name).is_dir():
            raise DatasetError(f"{rel(train_dir, root)} has no test folder test/{train_dir.name}/; add its test "
                               "images or remove the class")
        if not (train_dir / NORMAL).is_dir():
            raise DatasetError(f"no {rel(train_dir / NORMAL, root)}/ folder; put the normal training images of "
                               f"{train_dir.name!r} there")
    train: list[Sample] = []
    test: list[Sample] = []
    for cls_dir in class_dirs:
        train += [sample(root, p, None, cls_dir.name, NORMAL, 0)
                  for p in image_files(root / "train" / cls_dir.name / NORMAL)]
        test += _test_class(root, cls_dir)
    return build_meta(root, train, test)


def _test_class(root: Path, cls_dir: Path) -> list[Sample]:
    """Test samples of one class, defect images paired by name with their optional masks."""
    loose = image_files(cls_dir)
    if loose:
        raise DatasetError(f"{rel(loose[0], root)}: test images go in {rel(cls_dir, root)}/{NORMAL}/ or "
                           f"{rel(cls_dir, root)}/DEFECT_TYPE/")
    mask_dir = cls_dir / MASKS
    flat = stem_index(image_files(mask_dir), root)
    owner: dict[Path, Path] = {}
    samples: list[Sample] = []
    for specie_dir in (d for d in subdirs(cls_dir) if d.name != MASKS):
        images = image_files(specie_dir)
        if specie_dir.name == NORMAL:
            samples += [sample(root, p, None, cls_dir.name, NORMAL, 0) for p in images]
            continue
        own = stem_index(image_files(mask_dir / specie_dir.name), root)
        for image in images:
            mask = find_mask(image, own, (SUFFIX,)) or find_mask(image, flat, (SUFFIX,))
            if mask is not None and mask in owner:
                raise DatasetError(f"mask {rel(mask, root)} matches both {rel(owner[mask], root)} and "
                                   f"{rel(image, root)}; move it to {rel(mask_dir, root)}/DEFECT_TYPE/")
            if mask is not None:
                owner[mask] = image
            samples.append(sample(root, image, mask, cls_dir.name, specie_dir.name, 1))
    if not samples:
        raise DatasetError(f"no test images in {rel(cls_dir, root)}/*/; put them in {NORMAL}/ and DEFECT_TYPE/ "
                           "folders or remove the class")
    all_masks = image_files(mask_dir) + [m for d in subdirs(mask_dir) for m in image_files(d)]
    for mask in all_masks:
        if mask not in owner:
            raise DatasetError(f"mask {rel(mask, root)} belongs to no defect image of {cls_dir.name!r} (a mask of "
                               f"DEFECT_TYPE/NAME.png is named masks/NAME{SUFFIX}.png); rename or remove it")
    return samples
