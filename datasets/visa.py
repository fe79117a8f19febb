"""VisA, as shipped (``VisA_20220922.tar``) and in the ``VisA_pytorch`` form of its ``prepare_data.py``.

As shipped, the split file ``split_csv/1cls.csv`` lists every image: columns
``object`` (class), ``split`` (``train``/``test``), ``label``
(``normal``/``anomaly``), ``image`` and ``mask`` (paths relative to the dataset
folder, e.g. ``candle/Data/Images/Anomaly/000.JPG`` and
``candle/Data/Masks/Anomaly/000.png``). The CSV pairs each anomalous image
with its mask; that pairing is checked by name (same stem). Samples keep the
CSV's row order within each class and split, as the published generator does
(the CSV is not sorted). ``--split_csv FILE`` names the CSV when it is not in
``split_csv/`` (it is also in github.com/amazon-science/spot-diff). Normal samples get ``specie_name`` ``good``,
anomalous ones ``anomaly``.

``VisA_pytorch`` (``prepare_data.py --split-type 1cls``):
``[1cls/]CLASS/{train/good, test/good, test/bad, ground_truth/bad}``, masks of
the image stem (``000.JPG`` -> ``000.png``). Its files carry no order of their
own: they are listed in name order, unless the CSV is given
(``--split_csv split_csv/1cls.csv``, or found as ``split_csv/1cls.csv`` in the
dataset folder or a folder between it and the class folders), which restores the
published order and is checked to list exactly the same images.
"""
from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

from crane.data.meta import DatasetError
from datasets.common import (
    RESTORE,
    Layout,
    Listing,
    Meta,
    Request,
    Sample,
    Tree,
    build_meta,
    has_dirs,
    missing_class,
    wanted_classes,
)
from datasets.mvtec_like import Style, fixed_layout

KEY = "visa"
CLASSES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
           "pcb4", "pipe_fryum")
CSV = PurePosixPath("split_csv/1cls.csv")
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}
PYTORCH = Style(mask_suffixes=("",))


def read_split_csv(path: Path, shown: str) -> list[dict[str, str]]:
    """The rows of ``1cls.csv`` (stripped), checked for the five columns and valid values."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{shown} lacks the column(s) {', '.join(missing)} (want {', '.join(COLUMNS)}); "
                                   f"{RESTORE}")
            rows = [{k: (row[k] or "").strip() for k in COLUMNS} for row in reader]
    except OSError as e:
        raise DatasetError(f"cannot read {shown}: {e.strerror}") from None
    for line, row in enumerate(rows, start=2):
        if row["split"] not in ("train", "test") or row["label"] not in LABELS or not row["image"] \
                or not row["object"]:
            raise DatasetError(f"{shown} line {line}: want an object, split train/test, label normal/anomaly and "
                               f"an image path, got {row['object']!r}, {row['split']!r}, {row['label']!r}, "
                               f"{row['image']!r}; {RESTORE}")
        row["line"] = str(line)
    return rows


def _shown(tree: Tree, path: Path) -> str:
    return tree.rel(path) if path.is_relative_to(tree.root) else str(path)


def _csv_listing(tree: Tree, request: Request) -> Listing:
    csv_path = request.split_csv or tree.base / CSV
    if not csv_path.is_file():
        raise DatasetError(f"VisA's split file {tree.rel(tree.base / CSV)} is missing: restore it from the VisA "
                           "archive or pass --split_csv FILE (also in github.com/amazon-science/spot-diff)")
    shown = _shown(tree, csv_path)
    rows = read_split_csv(csv_path, shown)
    wanted = wanted_classes(KEY, CLASSES, request)
    prefix = PurePosixPath(tree.rel(tree.base)) if tree.base != tree.root else PurePosixPath()
    splits: dict[str, list[Sample]] = {"train": [], "test": []}
    masks: dict[str, str] = {}
    for cls_name in wanted:
        cls_rows = [r for r in rows if r["object"] == cls_name]
        if not cls_rows:
            raise missing_class(KEY, cls_name, f"rows with object {cls_name} in {shown}", request)
        if not any(r["split"] == "test" and r["label"] == "anomaly" for r in cls_rows):
            raise DatasetError(f"{shown} lists no anomalous test image of {cls_name!r}; {RESTORE}")
        for row in cls_rows:
            where = f"{shown} line {row['line']}"
            anomaly = LABELS[row["label"]]
            image, mask = row["image"], row["mask"]
            if anomaly and not mask:
                raise DatasetError(f"{where}: anomalous image {image} has no mask path; {RESTORE}")
            if anomaly and PurePosixPath(mask).stem.lower() != PurePosixPath(image).stem.lower():
                raise DatasetError(f"{where}: mask {mask} does not match image {image} by name; {RESTORE}")
            if anomaly and mask in masks:
                raise DatasetError(f"{where}: mask {mask} is also the mask of line {masks[mask]}; {RESTORE}")
            if anomaly:
                masks[mask] = row["line"]
            splits[row["split"]].append({
                "img_path": (prefix / image).as_posix(),
                "mask_path": (prefix / mask).as_posix() if anomaly else "",
                "cls_name": cls_name,
                "specie_name": "anomaly" if anomaly else "good",
                "anomaly": anomaly,
            })
    others = sorted({r["object"] for r in rows} - set(CLASSES))
    notes = [f"ignored rows of objects that are not VisA classes: {', '.join(others)}"] if others else []
    left_out = [c for c in CLASSES if c not in wanted]
    if left_out:
        notes.append(f"left out by --classes: {', '.join(left_out)}")
    return Listing(build_meta(tree, splits["train"], splits["test"], wanted), notes)


_PYTORCH = fixed_layout("", KEY, CLASSES, PYTORCH, marks=("ground_truth",))


def _pytorch_listing(tree: Tree, request: Request) -> Listing:
    listing = _PYTORCH.read(tree, request)
    beside = [folder / CSV for folder in (tree.base, *tree.base.parents) if folder.is_relative_to(tree.root)]
    csv_path = request.split_csv or next((path for path in beside if path.is_file()), None)
    if csv_path is None:
        listing.notes.append("VisA_pytorch keeps no order of its own: listed in name order; pass --split_csv "
                             "split_csv/1cls.csv (from the VisA archive) for the published order")
        return listing
    shown = _shown(tree, csv_path)
    listing.meta = _csv_order(listing.meta, read_split_csv(csv_path, shown), shown)
    listing.notes.append(f"samples in the row order of {shown}")
    return listing


def _csv_order(meta: Meta, rows: list[dict[str, str]], shown: str) -> Meta:
    """Reorder each class and split of a ``VisA_pytorch`` listing as the CSV rows; both must list the same images."""
    ordered: Meta = {}
    for split, classes in meta.items():
        ordered[split] = {}
        for cls_name, samples in classes.items():
            by_key = {(s["anomaly"], PurePosixPath(s["img_path"]).name.lower()): s for s in samples}
            keys = [(LABELS[r["label"]], PurePosixPath(r["image"]).name.lower())
                    for r in rows if r["object"] == cls_name and r["split"] == split]
            for row_key in keys:
                if row_key not in by_key:
                    folder = "bad" if row_key[0] else "good"
                    raise DatasetError(f"{shown} lists {cls_name}/{split}/{folder}/{row_key[1]} but the "
                                       f"VisA_pytorch folder lacks it; {RESTORE}")
            unlisted = set(by_key) - set(keys)
            if unlisted:
                stray = by_key[min(unlisted)]["img_path"]
                raise DatasetError(f"{stray} is not in {shown} ({split} split of {cls_name}); the CSV and the "
                                   "folders disagree: pass the 1cls.csv these folders were made from")
            ordered[split][cls_name] = [by_key[k] for k in keys]
    return ordered


LAYOUTS = (  # the converted form first: a split_csv/ folder may sit beside it
    Layout("VisA_pytorch (prepare_data.py 1cls): CLASS/{train/good,test/good,test/bad,ground_truth/bad}",
           _PYTORCH.detect, _pytorch_listing),
    Layout("VisA as shipped: CLASS/Data/{Images,Masks}/ with split_csv/1cls.csv",
           lambda base: any(has_dirs(base, f"{c}/Data/Images") for c in CLASSES), _csv_listing),
)
