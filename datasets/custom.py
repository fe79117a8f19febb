"""Your own data, in the custom layout of datasets/README.md::

    ROOT/train/CLASS/good/*               normal training images (optional)
    ROOT/test/CLASS/good/*                normal test images
    ROOT/test/CLASS/DEFECT_TYPE/*         defect images
    ROOT/test/CLASS/masks/NAME_mask.*     mask of test/CLASS/DEFECT_TYPE/NAME.* (optional)

The normal folder's name is matched in any case (``Good/``, ``GOOD/``), as the
published generator does for test images. A mask may also sit in
``masks/DEFECT_TYPE/NAME_mask.*`` (looked up first), which keeps names unique
when two defect types hold images of the same name. A defect image without a
mask is kept with an empty ``mask_path`` (it counts for image metrics only).
Every file under ``masks/`` must be the mask of a defect image of its class,
which catches misspelt mask names; an empty class or defect folder is an error.
Classes, defect types and images are listed in name order. Images: PNG, JPEG,
BMP, TIFF.
"""
from __future__ import annotations

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
    image_files,
    nonempty_images,
    require_dir,
    subdirs,
)

NORMAL = "good"
MASKS = "masks"
SUFFIX = "_mask"


def _is_normal(folder: Path) -> bool:
    return folder.name.lower() == NORMAL


def listing(tree: Tree, request: Request) -> Listing:
    """List a custom dataset folder; see the module docstring for the layout."""
    root = tree.base
    test_root = require_dir(child(root, "test"), tree, "test images, as test/CLASS/good/ and test/CLASS/DEFECT/")
    class_dirs = subdirs(test_root)
    if not class_dirs:
        raise DatasetError(f"no class folders in {tree.rel(test_root)}/; put test images in test/CLASS/good/ and "
                           "test/CLASS/DEFECT_TYPE/")
    if request.classes is not None:
        unknown = [c for c in request.classes if not (test_root / c).is_dir()]
        if unknown:
            raise DatasetError(f"--classes: no class folder {tree.rel(test_root)}/{unknown[0]}/; the classes are "
                               f"{' '.join(d.name for d in class_dirs)}")
        class_dirs = [d for d in class_dirs if d.name in request.classes]
    train_root = child(root, "train")
    for train_dir in subdirs(train_root):
        if not (test_root / train_dir.name).is_dir():
            raise DatasetError(f"{tree.rel(train_dir)}/ has no test folder {tree.rel(test_root)}/{train_dir.name}/; "
                               "add its test images or remove the class")
        if not any(_is_normal(d) for d in subdirs(train_dir)):
            raise DatasetError(f"no {tree.rel(train_dir)}/{NORMAL}/ folder; put the normal training images of "
                               f"{train_dir.name!r} there")
    train: list[Sample] = []
    test: list[Sample] = []
    for cls_dir in class_dirs:
        for normal_dir in (d for d in subdirs(train_root / cls_dir.name) if _is_normal(d)):
            train += [tree.sample(p, None, cls_dir.name, NORMAL, 0) for p in image_files(normal_dir)]
        test += _test_class(tree, cls_dir)
    return Listing(build_meta(tree, train, test, [d.name for d in class_dirs]))


def _test_class(tree: Tree, cls_dir: Path) -> list[Sample]:
    """Test samples of one class, defect images paired by name with their optional masks."""
    loose = image_files(cls_dir)
    if loose:
        raise DatasetError(f"{tree.rel(loose[0])}: test images go in {tree.rel(cls_dir)}/{NORMAL}/ or "
                           f"{tree.rel(cls_dir)}/DEFECT_TYPE/")
    mask_dir = child(cls_dir, MASKS)
    pairer = Pairer(tree, (SUFFIX,), lambda image: "")
    samples: list[Sample] = []
    for specie_dir in (d for d in subdirs(cls_dir) if d != mask_dir):
        normal = _is_normal(specie_dir)
        images = nonempty_images(specie_dir, tree, "normal test images" if normal else "defect images")
        if normal:
            samples += [tree.sample(p, None, cls_dir.name, NORMAL, 0) for p in images]
            continue
        for image in images:
            mask = pairer.mask(image, [child(mask_dir, specie_dir.name), mask_dir], required=False)
            samples.append(tree.sample(image, mask, cls_dir.name, specie_dir.name, 1))
    if not samples:
        raise DatasetError(f"no test images in {tree.rel(cls_dir)}/*/; put them in {NORMAL}/ and DEFECT_TYPE/ "
                           "folders or remove the class")
    pairer.check_all_used([mask_dir, *subdirs(mask_dir)],
                          f"the mask of DEFECT_TYPE/NAME.png is {MASKS}/NAME{SUFFIX}.png")
    return samples


LAYOUT = Layout("custom: test/CLASS/{good,DEFECT_TYPE}/, optional train/CLASS/good/ and test/CLASS/masks/",
                lambda base: child(base, "test").is_dir(), listing)
