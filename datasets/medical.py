"""Medical sets with layouts of their own: brainmri, br35h, headct (as distributed), isic (the flat
ISIC 2016 folders), tn3k, cvc-colondb, cvc-clinicdb.

(The MVTec-style trees of headct and isic are read by ``datasets.mvtec_like``.)
All of them are test-only: the train split of their ``meta.json`` is empty.

- ``no/`` + ``yes/`` folders (brainmri, br35h): ``no`` normal, ``yes`` anomalous,
  image only. Listed ``no`` then ``yes``, each in name order (the published
  generator with sorted folders). Br35H's unlabelled ``pred/`` is skipped.
- image folder + mask folder (tn3k, cvc-*, isic 2016): every image has the mask
  of the same stem (plus the set's suffix, e.g. ISIC's ``_Segmentation``), all
  anomalous, in image name order (the published generators sort the names).
- HeadCT as distributed: ``head_ct/*.png`` (or ``head_ct/head_ct/*.png``) with
  ``labels.csv`` (``id, hemorrhage``; image ``NNN.png`` is id ``NNN``): label 1
  anomalous (``specie_name`` ``defect``, as AdaCLIP's conversion names it),
  0 normal; listed ``defect`` then ``good`` in name order, as the published
  generator lists the converted ``test/defect``, ``test/good`` tree.

Normal samples get ``specie_name`` ``good``, anomalous ones ``anomaly`` unless said otherwise.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from crane.data.meta import DatasetError
from datasets.common import (
    RESTORE,
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
    locate,
    mask_extension,
    nonempty_images,
    subdirs,
)


def _ignored(tree: Tree, folder: Path, used: Sequence[str]) -> list[str]:
    """A note naming the sub-folders of ``folder`` other than ``used``."""
    lower = {u.lower() for u in used}
    others = [tree.rel(d) + "/" for d in subdirs(folder) if d.name.lower() not in lower]
    return [f"ignored folders: {', '.join(others)}"] if others else []


def no_yes_layout(name: str, folder: str | None, cls_name: str) -> Layout:
    """Image-only set with normal images in ``folder/no`` and anomalous ones in ``folder/yes``."""
    def where(base: Path) -> Path:
        return child(base, folder) if folder else base

    def listing(tree: Tree, request: Request) -> Listing:
        top = where(tree.base)
        test: list[Sample] = []
        for label, anomaly in (("no", 0), ("yes", 1)):
            images = nonempty_images(child(top, label), tree, "anomalous images" if anomaly else "normal images")
            test += [tree.sample(p, None, cls_name, "anomaly" if anomaly else "good", anomaly) for p in images]
        notes = []
        pred = child(top, "pred")
        if pred.is_dir():
            notes.append(f"skipped {tree.rel(pred)}/ ({len(image_files(pred))} unlabelled images, no ground truth)")
        notes += _ignored(tree, top, ("no", "yes", "pred"))
        if folder:
            notes += _ignored(tree, tree.base, (folder,))
        return Listing(build_meta(tree, [], test, [cls_name]), notes)

    return Layout(name, lambda base: has_dirs(where(base), "no", "yes"), listing)


def image_mask_layout(name: str, images: str, masks: str, cls_name: str, mask_ext: str,
                      suffixes: Sequence[str] = ("",)) -> Layout:
    """All-anomalous set: every image in ``images/`` has its mask in ``masks/`` (same stem + suffix).

    ``images`` and ``masks`` are folder paths relative to the layout's folder (``a/b`` allowed).
    """
    def listing(tree: Tree, request: Request) -> Listing:
        image_dir, mask_dir = locate(tree.base, images), locate(tree.base, masks)
        ext = mask_extension(image_files(mask_dir), mask_ext)
        pairer = Pairer(tree, suffixes,
                        lambda image: f"{tree.rel(mask_dir)}/{image.stem}{suffixes[0]}{ext} (any image extension)")
        test = [tree.sample(p, pairer.mask(p, [mask_dir]), cls_name, "anomaly", 1)
                for p in nonempty_images(image_dir, tree, "images")]
        pairer.check_all_used([mask_dir], f"the mask of {image_dir.name}/NAME.EXT is {mask_dir.name}/NAME"
                                          f"{suffixes[0]}{ext}")
        notes = _ignored(tree, image_dir.parent, (image_dir.name, mask_dir.name))
        return Listing(build_meta(tree, [], test, [cls_name]), notes)

    return Layout(name, lambda base: has_dirs(base, images, masks), listing)


def headct_labels_layout(cls_name: str) -> Layout:
    """HeadCT as distributed: ``head_ct/[head_ct/]NNN.png`` with ``labels.csv``."""
    def labels_csv(base: Path) -> Path | None:
        return next((p for p in (child(base, "labels.csv"), child(child(base, "head_ct"), "labels.csv"))
                     if p.is_file()), None)

    def detect(base: Path) -> bool:
        return labels_csv(base) is not None and child(base, "head_ct").is_dir()

    def listing(tree: Tree, request: Request) -> Listing:
        csv_path = labels_csv(tree.base)
        assert csv_path is not None
        folder = child(tree.base, "head_ct")
        if not image_files(folder) and child(folder, "head_ct").is_dir():
            folder = child(folder, "head_ct")
        images = {}
        for p in nonempty_images(folder, tree, "the CT slices NNN.png"):
            if not p.stem.isdigit():
                raise DatasetError(f"{tree.rel(p)} is not named by a labels.csv id (NNN.png); move it out of "
                                   f"{tree.rel(folder)}/")
            if int(p.stem) in images:
                raise DatasetError(f"{tree.rel(images[int(p.stem)])} and {tree.rel(p)} have the same id; delete "
                                   "the stray copy")
            images[int(p.stem)] = p
        labels = _read_headct_labels(tree, csv_path)
        for image_id, image in images.items():
            if image_id not in labels:
                raise DatasetError(f"{tree.rel(image)} has no row in {tree.rel(csv_path)} (id {image_id}); "
                                   f"{RESTORE}")
        samples = {"defect": [], "good": []}
        for image_id, label in labels.items():
            if image_id not in images:
                raise DatasetError(f"{tree.rel(csv_path)} lists id {image_id} but {tree.rel(folder)}/"
                                   f"{image_id:03d}.png is missing; {RESTORE}")
            specie = "defect" if label else "good"
            samples[specie].append(tree.sample(images[image_id], None, cls_name, specie, label))
        for specie, what in (("defect", "hemorrhage (label 1)"), ("good", "normal (label 0)")):
            if not samples[specie]:
                raise DatasetError(f"{tree.rel(csv_path)} labels no image {what}; {RESTORE}")
        test = [s for specie in ("defect", "good") for s in sorted(samples[specie], key=lambda s: s["img_path"])]
        return Listing(build_meta(tree, [], test, [cls_name]))

    return Layout("HeadCT as distributed: head_ct/NNN.png (or head_ct/head_ct/NNN.png) with labels.csv",
                  detect, listing)


def _read_headct_labels(tree: Tree, path: Path) -> dict[int, int]:
    """``labels.csv``: a header (``id, hemorrhage``), then ``id,label`` rows with label 0 or 1."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DatasetError(f"{tree.rel(path)} is empty; {RESTORE}")
    header = [h.strip().lower() for h in rows[0]]
    id_col = header.index("id") if "id" in header else 0
    label_col = header.index("hemorrhage") if "hemorrhage" in header else 1
    labels: dict[int, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            image_id, label = int(row[id_col].strip()), int(row[label_col].strip())
        except (IndexError, ValueError):
            raise DatasetError(f"{tree.rel(path)} line {line}: want an integer id and a label 0 or 1, got "
                               f"{','.join(row)!r}; {RESTORE}") from None
        if label not in (0, 1) or image_id in labels:
            raise DatasetError(f"{tree.rel(path)} line {line}: "
                               + (f"id {image_id} is listed twice" if image_id in labels else
                                  f"label {label} is not 0 or 1") + f"; {RESTORE}")
        labels[image_id] = label
    return labels
