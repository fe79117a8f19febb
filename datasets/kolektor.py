"""KolektorSDD as distributed (``KolektorSDD.zip``): ``kosNN/PartN.jpg`` with ``kosNN/PartN_label.bmp``.

Every image has a label bitmap of the same stem plus ``_label``; the image is
defective iff its label has a non-zero pixel (binarised as the loader does,
``convert("L") > 0``), and then the label is its mask. All images go to the
test split of class ``electrical commutators`` (the published class name).
The common conversion (AdaCLIP's ``sdd-pre``) names the pieces
``kosNN_PartN_K`` under ``test/defect`` and ``test/good``; the full images
are listed in that order too: defective ones first, then normal ones, each by
``kosNN_PartN``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from crane.data.meta import DatasetError
from datasets.common import (
    RESTORE,
    Layout,
    Listing,
    Request,
    Sample,
    Tree,
    build_meta,
    image_files,
    stem_index,
    subdirs,
)
from crane.data.decode import Damaged, check_mask, quiet

CLASS = "electrical commutators"
SUFFIX = "_label"


def _item_dirs(base: Path) -> list[Path]:
    return [d for d in subdirs(base) if d.name.lower().startswith("kos") and d.name[3:].isdigit()]


def _defective(tree: Tree, label: Path) -> bool:
    with quiet():
        try:
            check_mask(label)
        except Damaged as e:
            raise DatasetError(f"unreadable mask {tree.rel(label)} ({e}); replace it with an intact copy from the "
                               "dataset archive") from None
        with Image.open(label) as img:
            return bool((np.asarray(img.convert("L")) > 0).any())


def listing(tree: Tree, request: Request) -> Listing:
    """List the raw KolektorSDD items."""
    samples: dict[str, list[tuple[str, Sample]]] = {"defect": [], "good": []}
    for item in _item_dirs(tree.base):
        files = image_files(item)
        labels = stem_index((p for p in files if p.stem.lower().endswith(SUFFIX)), tree)
        images = stem_index((p for p in files if not p.stem.lower().endswith(SUFFIX)), tree)
        if not images:
            raise DatasetError(f"no images in {tree.rel(item)}/ (PartN.jpg); restore the item from the dataset "
                               "archive")
        for stem, image in images.items():
            label = labels.pop(stem + SUFFIX, None)
            if label is None:
                raise DatasetError(f"no label for image {tree.rel(image)}: expected {tree.rel(item)}/"
                                   f"{image.stem}{SUFFIX}.bmp; {RESTORE}")
            specie = "defect" if _defective(tree, label) else "good"
            samples[specie].append((f"{item.name}_{image.stem}", tree.sample(
                image, label if specie == "defect" else None, CLASS, specie, int(specie == "defect"))))
        if labels:
            orphan = next(iter(labels.values()))
            raise DatasetError(f"label {tree.rel(orphan)} matches no image (the label of PartN.jpg is "
                               f"PartN{SUFFIX}.bmp); its image is missing: {RESTORE}, or delete the label")
    for specie, what in (("defect", "defective"), ("good", "defect-free")):
        if not samples[specie]:
            raise DatasetError(f"no {what} item among the kosNN/PartN images of {tree.base}; restore the dataset "
                               "archive")
    test = [s for specie in ("defect", "good") for _, s in sorted(samples[specie], key=lambda pair: pair[0])]
    return Listing(build_meta(tree, [], test, [CLASS]))


LAYOUT = Layout("KolektorSDD as distributed: kosNN/PartN.jpg with kosNN/PartN_label.bmp",
                lambda base: bool(_item_dirs(base)), listing)
