"""VisA: the split file ``ROOT/split_csv/1cls.csv`` lists every image.

Columns ``object`` (class), ``split`` (``train``/``test``), ``label``
(``normal``/``anomaly``), ``image`` and ``mask`` (paths relative to ROOT, e.g.
``candle/Data/Images/Anomaly/000.JPG`` and ``candle/Data/Masks/Anomaly/000.png``).
The CSV pairs each anomalous image with its mask; that pairing is checked by
name (same stem). Normal samples get ``specie_name`` ``good``, anomalous ones
``anomaly`` (VisA has no defect types in this file).
"""
from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

from crane.data.dataset import DatasetError
from datasets.common import Meta, Sample, build_meta

CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}


def generate(root: Path) -> Meta:
    """List VisA from its split CSV."""
    csv_path = root / CSV
    if not csv_path.is_file():
        raise DatasetError(f"split file not found: {csv_path}; VisA ships it as split_csv/1cls.csv, restore it from "
                           "the dataset archive")
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{csv_path} lacks the column(s) {', '.join(missing)} (want {', '.join(COLUMNS)}); "
                               "restore it from the dataset archive")
        rows = list(reader)
    splits: dict[str, list[Sample]] = {"train": [], "test": []}
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path} line {line}"
        split, label = row["split"].strip(), row["label"].strip()
        cls_name, image, mask = row["object"].strip(), row["image"].strip(), row["mask"].strip()
        if split not in splits or label not in LABELS or not image or not cls_name:
            raise DatasetError(f"{where}: want an object, split train/test, label normal/anomaly and an image "
                               f"path, got {cls_name!r}, {split!r}, {label!r}, {image!r}; restore the file from "
                               "the dataset archive")
        anomaly = LABELS[label]
        if anomaly and not mask:
            raise DatasetError(f"{where}: anomalous image {image} has no mask path; restore the file from the "
                               "dataset archive")
        if anomaly and PurePosixPath(mask).stem.lower() != PurePosixPath(image).stem.lower():
            raise DatasetError(f"{where}: mask {mask} does not match image {image} by name; restore the file from "
                               "the dataset archive")
        splits[split].append({
            "img_path": image,
            "mask_path": mask if anomaly else "",
            "cls_name": cls_name,
            "specie_name": "anomaly" if anomaly else "good",
            "anomaly": anomaly,
        })
    return build_meta(root, splits["train"], splits["test"])
