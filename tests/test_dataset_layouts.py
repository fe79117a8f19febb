"""Every accepted archive layout, as a tiny fake archive with the clutter real downloads carry.

Each builder writes 8x8 images in one layout of one dataset and returns the
samples the generator must produce, in ``meta.json`` order: (split, class,
image path, mask path, anomaly). Numbered names whose sort order differs from
their masks' (``1, 10, 2`` against ``10_mask, 1_mask, 2_mask``) make a
position pairing fail; ``.DS_Store``, ``Thumbs.db``, AppleDouble ``._*`` files,
``__MACOSX/`` and licence texts beside the masks must all be ignored. The
builders are also used by ``test_dataset_damage.py``.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the dataset tools are a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from datasets.generate import DATASETS, generate  # noqa: E402

Row = tuple[str, str, str, str, int]  # split, class, image path, mask path ("" if none), anomaly

MVTEC = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
         "toothbrush", "transistor", "wood", "zipper")
DTD = ("Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068", "Woven_125", "Marbled_078",
       "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069")
VISA = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4",
        "pipe_fryum")
NUMBERED = ("1", "10", "2")  # name order of images; their masks 10_mask, 1_mask, 2_mask sort differently


# ---- writing fake files -----------------------------------------------------------------------------------------

def img(path: Path, value: int = 90, mode: str = "RGB") -> Path:
    """An 8x8 image in the format of ``path``'s extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = ((np.arange(64).reshape(8, 8) * 3 + value) % 256).astype(np.uint8)
    image = Image.fromarray(np.stack([ramp, 255 - ramp, np.full_like(ramp, value)], axis=2))
    image.convert(mode).save(path)
    return path


def mask(path: Path, defect: bool = True) -> Path:
    """An 8x8 binary mask (a white square, or all black for a defect-free label)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((8, 8), np.uint8)
    if defect:
        arr[2:5, 3:6] = 255
    Image.fromarray(arr).save(path)
    return path


def clutter(folder: Path) -> None:
    """What a download picks up on the way: Finder and Explorer files, AppleDouble twins, a licence text."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "._0000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (folder / "desktop.ini").write_text("[.ShellClassInfo]\n")


def macosx(root: Path, *names: str) -> None:
    """The ``__MACOSX/`` folder a zip made on macOS unpacks to."""
    for name in names:
        (root / "__MACOSX" / name).mkdir(parents=True, exist_ok=True)
        (root / "__MACOSX" / name / "._000.png").write_bytes(b"\x00\x05\x16\x07")


def rows(meta: dict) -> list[Row]:
    """A ``meta.json`` as its rows, in order."""
    return [(split, cls_name, s["img_path"], s["mask_path"], s["anomaly"])
            for split in ("train", "test") for cls_name, samples in meta[split].items() for s in samples]


# ---- MVTec-style trees ------------------------------------------------------------------------------------------

def mvtec_class(root: Path, folder: str, cls_name: str, normal: str = "good", defect: str = "broken",
                ext: str = ".png", mask_ext: str = ".png", suffix: str = "_mask", masks: str = "ground_truth",
                train: bool = True) -> list[Row]:
    """One class in the MVTec layout: numbered defect images, two defect types, one normal folder."""
    c = root / folder
    out: list[Row] = []
    if train:
        for name in ("000", "001"):
            out.append(("train", cls_name, img(c / f"train/{normal}/{name}{ext}").relative_to(root).as_posix(), "", 0))
    test: list[Row] = []
    for specie in sorted([defect, f"{defect}_b", normal]):
        names = ("000",) if specie == normal else NUMBERED if specie == defect else ("005",)
        for name in names:
            image = img(c / f"test/{specie}/{name}{ext}").relative_to(root).as_posix()
            if specie == normal:
                test.append(("test", cls_name, image, "", 0))
            else:
                m = mask(c / f"{masks}/{specie}/{name}{suffix}{mask_ext}").relative_to(root).as_posix()
                test.append(("test", cls_name, image, m, 1))
    clutter(c / f"test/{normal}")
    clutter(c / f"{masks}/{defect}")
    return out + test


def by_split(rows_: list[Row]) -> list[Row]:
    """Train rows of every class first, then test rows, keeping each split's order."""
    return [r for r in rows_ if r[0] == "train"] + [r for r in rows_ if r[0] == "test"]


def build_mvtec(r: Path) -> list[Row]:
    out = [row for c in MVTEC for row in mvtec_class(r, c, c)]
    (r / "license.txt").write_text("CC BY-NC-SA 4.0")
    (r / "readme.txt").write_text("MVTec AD")
    macosx(r, "bottle")
    return by_split(out)


def build_mpdd(r: Path) -> list[Row]:
    classes = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
    return by_split([row for c in classes for row in mvtec_class(r, c, c, defect="defective")])


def build_btad(r: Path) -> list[Row]:
    base = r / "BTech_Dataset_transformed"  # the zip's own top folder
    out = mvtec_class(base, "01", "01", normal="ok", defect="ko", ext=".bmp", suffix="")
    out += mvtec_class(base, "02", "02", normal="ok", defect="ko", suffix="")
    out += mvtec_class(base, "03", "03", normal="ok", defect="ko", ext=".bmp", mask_ext=".bmp", suffix="")
    prefix = "BTech_Dataset_transformed/"
    return by_split([(s, c, prefix + i, prefix + m if m else "", a) for s, c, i, m, a in out])


def build_dtd(r: Path) -> list[Row]:
    return by_split([row for c in DTD for row in mvtec_class(r, c, c, defect="bad")])


def build_sdd_converted(r: Path) -> list[Row]:
    return by_split(mvtec_class(r, "electrical commutators", "electrical commutators", defect="defect"))


def build_sdd_underscore(r: Path) -> list[Row]:
    out = mvtec_class(r, "electrical_commutators", "electrical commutators", defect="defect", train=False)
    return by_split(out)


def build_sdd_raw(r: Path) -> list[Row]:
    """KolektorSDD.zip: kosNN/PartN.jpg with PartN_label.bmp; defective iff the label has a white pixel."""
    defect: list[Row] = []
    good: list[Row] = []
    for item, parts in (("kos01", (0, 5, 7)), ("kos10", (0, 1)), ("kos02", (2,))):
        for part in parts:
            image = img(r / item / f"Part{part}.jpg")
            is_defect = (item, part) in {("kos01", 5), ("kos10", 1)}
            label = mask(r / item / f"Part{part}_label.bmp", defect=is_defect)
            key = (f"{item}_Part{part}", image.relative_to(r).as_posix(), label.relative_to(r).as_posix())
            (defect if is_defect else good).append(key)  # type: ignore[arg-type]
        clutter(r / item)
    c = "electrical commutators"
    return ([("test", c, i, m, 1) for _, i, m in sorted(defect)]  # type: ignore[misc]
            + [("test", c, i, "", 0) for _, i, _m in sorted(good)])  # type: ignore[misc]


# ---- VisA -------------------------------------------------------------------------------------------------------

VISA_ROWS = [  # (object, split, label, name): shuffled, as 1cls.csv is
    ("candle", "train", "normal", "0836"), ("candle", "train", "normal", "0451"),
    ("candle", "test", "normal", "0790"), ("candle", "test", "normal", "0107"),
    ("candle", "test", "anomaly", "010"), ("candle", "test", "anomaly", "002"),
]


def _visa_rows() -> list[tuple[str, str, str, str]]:
    out = list(VISA_ROWS)
    for c in VISA[1:]:
        out += [(c, "train", "normal", "062"), (c, "test", "normal", "023"), (c, "test", "anomaly", "001"),
                (c, "test", "anomaly", "000")]
    return out


def write_visa_csv(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        for c, split, label, name in _visa_rows():
            kind = "Normal" if label == "normal" else "Anomaly"
            image = f"{c}/Data/Images/{kind}/{name}.JPG"
            w.writerow([c, split, label, image, f"{c}/Data/Masks/Anomaly/{name}.png" if label == "anomaly" else ""])


def build_visa_csv(r: Path) -> list[Row]:
    write_visa_csv(r / "split_csv/1cls.csv")
    out: list[Row] = []
    for c, split, label, name in _visa_rows():
        kind = "Normal" if label == "normal" else "Anomaly"
        image = img(r / f"{c}/Data/Images/{kind}/{name}.JPG").relative_to(r).as_posix()
        m = mask(r / f"{c}/Data/Masks/Anomaly/{name}.png").relative_to(r).as_posix() if kind == "Anomaly" else ""
        out.append((split, c, image, m, int(kind == "Anomaly")))
        (r / c / "image_anno.csv").write_text("image,label,mask\n")
    clutter(r / "candle/Data/Masks/Anomaly")
    order = {c: i for i, c in enumerate(VISA)}
    return sorted(out, key=lambda row: (row[0] != "train", order[row[1]]))  # stable: CSV order within a class


def _visa_pytorch(base: Path, r: Path) -> list[tuple[str, str, str, str, int, str]]:
    """Files of ``prepare_data.py --split-type 1cls``; returns the rows with the CSV row name."""
    out = []
    for c, split, label, name in _visa_rows():
        folder = "good" if label == "normal" else "bad"
        image = img(base / c / split / folder / f"{name}.JPG").relative_to(r).as_posix()
        m = mask(base / c / "ground_truth/bad" / f"{name}.png").relative_to(r).as_posix() if folder == "bad" else ""
        out.append((split, c, image, m, int(folder == "bad"), name))
    clutter(base / "candle/test/good")
    return out


def build_visa_pytorch(r: Path) -> list[Row]:
    """``VisA_pytorch/1cls/...`` pointed at as ``VisA_pytorch``, no CSV: name order, bad before good."""
    files = _visa_pytorch(r / "1cls", r)
    order = {c: i for i, c in enumerate(VISA)}
    return sorted((row[:5] for row in files), key=lambda row: (row[0] != "train", order[row[1]], row[2]))


def build_visa_pytorch_csv(r: Path) -> list[Row]:
    """The same with ``split_csv/1cls.csv`` beside it: the CSV's order."""
    files = _visa_pytorch(r / "1cls", r)
    write_visa_csv(r / "split_csv/1cls.csv")
    order = {c: i for i, c in enumerate(VISA)}
    return sorted((row[:5] for row in files), key=lambda row: (row[0] != "train", order[row[1]]))


# ---- DAGM -------------------------------------------------------------------------------------------------------

def dagm_split(r: Path, folder: Path, cls_name: str, split: str, defective: Sequence[str], names: Sequence[str],
               labels_txt: bool = True) -> list[Row]:
    normal, bad = [], []
    lines = ["1"]
    for i, name in enumerate(names, start=1):
        image = img(folder / split / f"{name}.PNG", mode="L").relative_to(r).as_posix()
        if name in defective:
            label = mask(folder / split / "Label" / f"{name}_label.PNG").relative_to(r).as_posix()
            bad.append((split.lower(), cls_name, image, label, 1))
            lines.append(f"{i}\t1\t{name}.PNG\t0\t{name}_label.PNG")
        else:
            normal.append((split.lower(), cls_name, image, "", 0))
            lines.append(f"{i}\t0\t{name}.PNG\t0\t0")
    if labels_txt:
        (folder / split / "Label").mkdir(parents=True, exist_ok=True)
        (folder / split / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")
    return normal + bad


def build_dagm(r: Path) -> list[Row]:
    train, test = [], []
    for k in range(1, 11):
        c = f"Class{k}"
        train += [row for row in dagm_split(r, r / c, c, "Train", ("0002",), ("0001", "0002", "0003"))
                  if row[4] == 0]
        test += dagm_split(r, r / c, c, "Test", ("0010", "0002"), ("0001", "0002", "0010", "0011"),
                           labels_txt=k != 3)
    (r / "Class1_def").mkdir()  # the development set's defect-only folder: not a class
    img(r / "Class1_def/1.png", mode="L")
    clutter(r / "Class1/Test/Label")
    return train + test


def build_dagm_nested(r: Path) -> list[Row]:
    test = []
    for k in range(1, 11):
        c = f"Class{k}"
        test += dagm_split(r, r / c / c, c, "Test", ("0001",), ("0001", "0002"))
    return test


# ---- medical ----------------------------------------------------------------------------------------------------

def build_headct_tree(r: Path) -> list[Row]:
    out = [("test", "brain", img(r / f"brain/test/defect/{n}.png", mode="L").relative_to(r).as_posix(), "", 1)
           for n in ("100", "101")]
    out += [("test", "brain", img(r / f"brain/test/good/{n}.png", mode="L").relative_to(r).as_posix(), "", 0)
            for n in ("000", "001")]
    clutter(r / "brain/test/good")
    return out


def _headct_distributed(r: Path, folder: Path) -> list[Row]:
    labels = {0: 1, 1: 1, 2: 0, 3: 1, 10: 0, 100: 0}
    (r / "labels.csv").write_text("id, hemorrhage\n" + "".join(f"{i},{v}\n" for i, v in labels.items()))
    paths = {i: img(folder / f"{i:03d}.png", mode="L").relative_to(r).as_posix() for i in labels}
    clutter(folder)
    return ([("test", "brain", paths[i], "", 1) for i in sorted(labels) if labels[i]]
            + [("test", "brain", paths[i], "", 0) for i in sorted(labels) if not labels[i]])


def build_headct_distributed(r: Path) -> list[Row]:
    return _headct_distributed(r, r / "head_ct")


def build_headct_kaggle(r: Path) -> list[Row]:
    return _headct_distributed(r, r / "head_ct/head_ct")


def build_brainmri(r: Path) -> list[Row]:
    out = [("test", "brain", img(r / f"brain_tumor_dataset/no/{n}").relative_to(r).as_posix(), "", 0)
           for n in ("1 no.jpeg", "N1.JPG", "no 10.jpg")]
    out += [("test", "brain", img(r / f"brain_tumor_dataset/yes/{n}").relative_to(r).as_posix(), "", 1)
            for n in ("Y1.jpg", "Y10.jpg", "y2.png")]
    img(r / "no/N1.JPG")  # the Kaggle archive's duplicate copy at the top: not read
    img(r / "yes/Y1.jpg")
    clutter(r / "brain_tumor_dataset/no")
    return out


def build_brainmri_top(r: Path) -> list[Row]:
    out = [("test", "brain", img(r / "no/N1.JPG").relative_to(r).as_posix(), "", 0)]
    return out + [("test", "brain", img(r / "yes/Y1.jpg").relative_to(r).as_posix(), "", 1)]


def build_br35h_kaggle(r: Path) -> list[Row]:
    out = [("test", "brain", img(r / f"no/no{n}.jpg").relative_to(r).as_posix(), "", 0) for n in NUMBERED]
    out += [("test", "brain", img(r / f"yes/y{n}.jpg").relative_to(r).as_posix(), "", 1) for n in NUMBERED]
    for n in ("0", "1"):
        img(r / f"pred/pred{n}.jpg")  # unlabelled: skipped
    clutter(r / "yes")
    return out


def build_br35h_tree(r: Path) -> list[Row]:
    out = [("test", "brain", img(r / "brain/no/no0.jpg").relative_to(r).as_posix(), "", 0)]
    out += [("test", "brain", img(r / "brain/yes/y0.jpg").relative_to(r).as_posix(), "", 1)]
    img(r / "brain/pred/pred0.jpg")
    return out


def _image_mask(r: Path, images: str, masks: str, names: Sequence[str], ext: str, mask_ext: str, cls_name: str,
                suffix: str = "") -> list[Row]:
    out = []
    for n in names:
        image = img(r / images / f"{n}{ext}").relative_to(r).as_posix()
        out.append(("test", cls_name, image, mask(r / masks / f"{n}{suffix}{mask_ext}").relative_to(r).as_posix(), 1))
    clutter(r / images)
    for name in ("ATTRIBUTION.txt", "LICENSE.txt"):
        (r / masks / name).write_text("CC-BY-NC")
    return out


def build_isic_distributed(r: Path) -> list[Row]:
    out = _image_mask(r, "ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth",
                      ("ISIC_0000003", "ISIC_0000012", "ISIC_0000004"), ".jpg", ".png", "skin", "_Segmentation")
    macosx(r, "ISBI2016_ISIC_Part1_Test_Data")
    return sorted(out, key=lambda row: row[2])


def build_isic_tree(r: Path) -> list[Row]:
    out = []
    for n in ("ISIC_0000003", "ISIC_0000012", "ISIC_0000004"):
        image = img(r / f"skin/test/defect/{n}.jpg").relative_to(r).as_posix()
        out.append(("test", "skin", image, mask(r / f"skin/ground_truth/{n}_Segmentation.png").relative_to(r)
                    .as_posix(), 1))
    for name in ("ATTRIBUTION.txt", "LICENSE.txt"):
        (r / "skin/ground_truth" / name).write_text("CC-BY-NC")
    return sorted(out, key=lambda row: row[2])


def build_isic_anomalyclip(r: Path) -> list[Row]:
    out = []
    for n in ("ISIC_0000012", "ISIC_0000003"):
        image = img(r / f"skin/test/anomaly/{n}.jpg").relative_to(r).as_posix()
        truth = mask(r / f"skin/ISBI2016_ISIC_Part1_Test_GroundTruth/{n}_Segmentation.png").relative_to(r).as_posix()
        out.append(("test", "skin", image, truth, 1))
    return sorted(out, key=lambda row: row[2])


def build_tn3k(r: Path) -> list[Row]:
    out = _image_mask(r, "test-image", "test-mask", ("0000", "0010", "0002"), ".jpg", ".jpg", "thyroid")
    img(r / "trainval-image/0005.jpg")  # not read
    mask(r / "trainval-mask/0005.jpg")
    return sorted(out, key=lambda row: row[2])


def build_colondb(r: Path) -> list[Row]:
    return sorted(_image_mask(r, "images", "masks", NUMBERED, ".png", ".png", "colon"), key=lambda row: row[2])


def build_clinicdb_distributed(r: Path) -> list[Row]:
    out = _image_mask(r, "Original", "Ground Truth", (*NUMBERED, "100"), ".tif", ".tif", "colon")
    return sorted(out, key=lambda row: row[2])


def build_clinicdb_wrapped(r: Path) -> list[Row]:
    """``CVC-ClinicDB.rar`` unpacks to its own folder ``CVC-ClinicDB/``."""
    out = _image_mask(r / "CVC-ClinicDB", "Original", "Ground Truth", NUMBERED, ".tif", ".tif", "colon")
    return sorted([(s, c, f"CVC-ClinicDB/{i}", f"CVC-ClinicDB/{m}", a) for s, c, i, m, a in out],
                  key=lambda row: row[2])


def pranet(name: str) -> Callable[[Path], list[Row]]:
    """PraNet's ``Polyp DataSet.zip``: every polyp test set in TestDataset/, and a TrainDataset/."""
    def build(r: Path) -> list[Row]:
        base = r / "TestDataset" / name
        out = _image_mask(base, "images", "masks", NUMBERED, ".png", ".png", "colon")
        img(r / "TestDataset/Kvasir/images/cju0qkwl35piu0993l0dewei2.png")
        img(r / "TrainDataset/image/1.png")
        return sorted([(s, c, f"TestDataset/{name}/{i}", f"TestDataset/{name}/{m}", a) for s, c, i, m, a in out],
                      key=lambda row: row[2])
    return build


def build_clinicdb_png(r: Path) -> list[Row]:
    return sorted(_image_mask(r, "images", "masks", NUMBERED, ".png", ".png", "colon"), key=lambda row: row[2])


# ---- AdaCLIP's preprocessed folders (meta.json included, kept as it is) ---------------------------------------------

def adaclip_folder(r: Path, cls_name: str, masks: bool, normal: bool = True) -> list[Row]:
    """A preprocessed folder with the meta.json AdaCLIP ships: its own class name, ``os.listdir`` order."""
    out: list[Row] = []
    species = (["good"] if normal else []) + ["defect"]  # as os.listdir happened to list them
    for specie in species:
        for n in ("b", "a"):
            image = img(r / cls_name / "test" / specie / f"{n}.png").relative_to(r).as_posix()
            m = ""
            if specie != "good" and masks:
                m = mask(r / cls_name / "ground_truth" / specie / f"{n}_mask.png").relative_to(r).as_posix()
            out.append(("test", cls_name, image, m, int(specie != "good")))
    (r / cls_name / "train" / "good").mkdir(parents=True, exist_ok=True)
    meta = {"train": {cls_name: []}, "test": {cls_name: [
        {"img_path": i, "mask_path": m, "cls_name": c, "specie_name": i.split("/")[2], "anomaly": a}
        for _, c, i, m, a in out]}}
    (r / "meta.json").write_text(json.dumps(meta, indent=4) + "\n")
    return out


def build_adaclip_dagm(r: Path) -> list[Row]:
    out: list[Row] = []
    meta: dict = {"train": {}, "test": {}}
    for k in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10):
        c = f"Class{k}"
        rows_ = [("test", c, img(r / c / "test/good/0001.PNG", mode="L").relative_to(r).as_posix(), "", 0),
                 ("test", c, img(r / c / "test/defect/0002.PNG", mode="L").relative_to(r).as_posix(),
                  mask(r / c / "ground_truth/defect/0002_label.PNG").relative_to(r).as_posix(), 1)]
        meta["test"][c] = [{"img_path": i, "mask_path": m, "cls_name": c, "specie_name": "", "anomaly": a}
                           for _, _, i, m, a in rows_]
        out += rows_
    (r / "meta.json").write_text(json.dumps(meta, indent=4) + "\n")
    return out


def adaclip(cls_name: str, masks: bool, normal: bool = True) -> Callable[[Path], list[Row]]:
    return lambda r: adaclip_folder(r, cls_name, masks, normal)


def adaclip_wrapped(folder: str, cls_name: str, masks: bool) -> Callable[[Path], list[Row]]:
    """The preprocessed archive unpacked into the dataset folder with its own top folder."""
    def build(r: Path) -> list[Row]:
        out = adaclip_folder(r / folder, cls_name, masks)
        return [(s, c, f"{folder}/{i}", f"{folder}/{m}" if m else "", a) for s, c, i, m, a in out]
    return build


def with_foreign_meta(build: Callable[[Path], list[Row]]) -> Callable[[Path], list[Row]]:
    """A tree as the original archive, with a meta.json from elsewhere (AdaCLIP ships MVTec AD so):
    kept in its own order, here normal test images first as ``os.listdir`` may give them."""
    def with_meta(r: Path) -> list[Row]:
        listed = build(r)
        ordered = [row for row in listed if row[0] == "train"]
        for cls_name in dict.fromkeys(row[1] for row in listed if row[0] == "test"):
            test = [row for row in listed if row[0] == "test" and row[1] == cls_name]
            ordered += [row for row in test if not row[4]] + [row for row in test if row[4]]
        meta: dict = {"train": {}, "test": {}}
        for split, cls_name, image, mask_path, anomaly in ordered:
            meta[split].setdefault(cls_name, []).append({"img_path": image, "mask_path": mask_path,
                                                         "cls_name": cls_name, "specie_name": "", "anomaly": anomaly})
        (r / "meta.json").write_text(json.dumps(meta, indent=4) + "\n")
        return ordered
    return with_meta


def adaclip_without_meta(cls_name: str, masks: bool) -> Callable[[Path], list[Row]]:
    """AdaCLIP's tree whose meta.json was lost: listed afresh (defect before good, names sorted)."""
    def build(r: Path) -> list[Row]:
        out = adaclip_folder(r, cls_name, masks)
        (r / "meta.json").unlink()
        return sorted(out, key=lambda row: row[2])
    return build


# ---- custom -----------------------------------------------------------------------------------------------------

def build_custom(r: Path) -> list[Row]:
    out: list[Row] = [("train", "widget", img(r / "train/widget/Good/a.png").relative_to(r).as_posix(), "", 0)]
    test: list[Row] = []
    test.append(("test", "gadget", img(r / "test/gadget/GOOD/x.png").relative_to(r).as_posix(), "", 0))
    for specie in ("scratch", "stain"):
        test.append(("test", "gadget", img(r / f"test/gadget/{specie}/x.png").relative_to(r).as_posix(),
                     mask(r / f"test/gadget/masks/{specie}/x_mask.png").relative_to(r).as_posix(), 1))
    for n in NUMBERED:
        test.append(("test", "widget", img(r / f"test/widget/crack/{n}.png").relative_to(r).as_posix(),
                     mask(r / f"test/widget/masks/{n}_mask.png").relative_to(r).as_posix(), 1))
    test.append(("test", "widget", img(r / "test/widget/dent/d.jpg").relative_to(r).as_posix(), "", 1))
    test.append(("test", "widget", img(r / "test/widget/good/c.png").relative_to(r).as_posix(), "", 0))
    clutter(r / "test/widget/masks")
    return out + test


# (key, builder, extra generate() arguments, the layout named in the report)
CASES: dict[str, tuple[str, Callable[[Path], list[Row]], dict, str]] = {
    "mvtec": ("mvtec", build_mvtec, {}, "MVTec AD archive"),
    "mpdd": ("mpdd", build_mpdd, {}, "MPDD archive"),
    "btad": ("btad", build_btad, {}, "BTAD archive"),
    "dtd": ("dtd", build_dtd, {}, "DTD-Synthetic archive"),
    "sdd-converted": ("sdd", build_sdd_converted, {}, "converted to the MVTec layout"),
    "sdd-underscore": ("sdd", build_sdd_underscore, {}, "converted to the MVTec layout"),
    "sdd-raw": ("sdd", build_sdd_raw, {}, "KolektorSDD as distributed"),
    "sdd-adaclip": ("sdd", adaclip("SDD", True), {}, "AdaCLIP preprocessed folder"),
    "visa-csv": ("visa", build_visa_csv, {}, "VisA as shipped"),
    "visa-pytorch": ("visa", build_visa_pytorch, {}, "VisA_pytorch"),
    "visa-pytorch-csv": ("visa", build_visa_pytorch_csv, {}, "VisA_pytorch"),
    "dagm": ("dagm", build_dagm, {}, "DAGM 2007 as distributed"),
    "dagm-nested": ("dagm", build_dagm_nested, {}, "DAGM 2007 as distributed"),
    "dagm-adaclip": ("dagm", build_adaclip_dagm, {}, "AdaCLIP preprocessed folder"),
    "headct-tree": ("headct", build_headct_tree, {}, "MVTec-style tree"),
    "headct-distributed": ("headct", build_headct_distributed, {}, "HeadCT as distributed"),
    "headct-kaggle": ("headct", build_headct_kaggle, {}, "HeadCT as distributed"),
    "headct-adaclip": ("headct", adaclip("headct", False), {}, "AdaCLIP preprocessed folder"),
    "headct-adaclip-wrapped": ("headct", adaclip_wrapped("HeadCT_anomaly_detection", "headct", False), {},
                               "AdaCLIP preprocessed folder"),
    "headct-adaclip-no-meta": ("headct", adaclip_without_meta("headct", False), {}, "AdaCLIP preprocessed folder"),
    "mvtec-with-meta": ("mvtec", with_foreign_meta(build_mvtec), {}, "MVTec AD archive"),
    "visa-with-meta": ("visa", with_foreign_meta(build_visa_csv), {}, "VisA as shipped"),
    "brainmri": ("brainmri", build_brainmri, {}, "Kaggle archive: brain_tumor_dataset"),
    "brainmri-top": ("brainmri", build_brainmri_top, {}, "no/, yes/ at the top"),
    "brainmri-adaclip": ("brainmri", adaclip("brain_mri", False), {}, "AdaCLIP preprocessed folder"),
    "br35h-kaggle": ("br35h", build_br35h_kaggle, {}, "Kaggle archive: no/, yes/, pred/"),
    "br35h-tree": ("br35h", build_br35h_tree, {}, "brain/{no,yes}/"),
    "br35h-adaclip": ("br35h", adaclip("br35h", False), {}, "AdaCLIP preprocessed folder"),
    "isic-distributed": ("isic", build_isic_distributed, {}, "ISIC 2016 test archives"),
    "isic-tree": ("isic", build_isic_tree, {}, "skin/ground_truth/"),
    "isic-anomalyclip": ("isic", build_isic_anomalyclip, {}, "AnomalyCLIP's tree"),
    "isic-adaclip": ("isic", adaclip("isic", True, normal=False), {}, "AdaCLIP preprocessed folder"),
    "tn3k": ("tn3k", build_tn3k, {}, "TN3K as distributed"),
    "tn3k-adaclip": ("tn3k", adaclip("tn3k", True, normal=False), {}, "AdaCLIP preprocessed folder"),
    "colondb": ("cvc-colondb", build_colondb, {}, "images/ with masks/"),
    "colondb-pranet": ("cvc-colondb", pranet("CVC-ColonDB"), {}, "PraNet's polyp test sets"),
    "clinicdb-pranet": ("cvc-clinicdb", pranet("CVC-ClinicDB"), {}, "PraNet's polyp test sets"),
    "colondb-adaclip": ("cvc-colondb", adaclip("ColonDB", True, normal=False), {},
                        "AdaCLIP preprocessed folder"),
    "clinicdb-distributed": ("cvc-clinicdb", build_clinicdb_distributed, {}, "CVC-ClinicDB as distributed"),
    "clinicdb-wrapped": ("cvc-clinicdb", build_clinicdb_wrapped, {}, "CVC-ClinicDB as distributed"),
    "clinicdb-png": ("cvc-clinicdb", build_clinicdb_png, {}, "images/ with masks/"),
    "clinicdb-adaclip": ("cvc-clinicdb", adaclip("ClinicDB", True, normal=False), {},
                         "AdaCLIP preprocessed folder"),
    "custom": ("custom", build_custom, {}, "custom"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_gives_the_true_samples(case: str, tmp_path: Path) -> None:
    key, build, kwargs, layout = CASES[case]
    expected = build(tmp_path)
    before = (tmp_path / "meta.json").read_bytes() if (tmp_path / "meta.json").exists() else None
    outcome = generate(key, tmp_path, **kwargs)
    assert layout in outcome.layout
    assert rows(outcome.meta) == expected  # sample by sample: path, mask, label, class, and the order
    written = json.loads((tmp_path / "meta.json").read_text())
    assert {k: v for k, v in written.items() if k != "generated_by"} == outcome.meta
    assert not list(tmp_path.glob(".meta.*"))  # no temporary file left behind
    if before is not None:  # a meta.json that came with the download: accepted as it is
        assert (tmp_path / "meta.json").read_bytes() == before and not outcome.written
    else:
        assert written["generated_by"] == f"python -m datasets.generate {key}"
    again = generate(key, tmp_path, **kwargs)  # a second run finds the same layout beside its own meta.json
    assert rows(again.meta) == expected and again.layout == outcome.layout
    if before is None:  # a generated listing names normal samples "good"
        assert all((s["specie_name"] == "good") == (s["anomaly"] == 0)
                   for samples in written["test"].values() for s in samples)


def test_every_dataset_has_a_case() -> None:
    assert {key for key, *_ in CASES.values()} == set(DATASETS)


def test_reports_name_what_was_skipped(tmp_path: Path) -> None:
    build_br35h_kaggle(tmp_path / "br35h")
    notes = generate("br35h", tmp_path / "br35h").notes
    assert any("skipped pred/" in n and "2 unlabelled" in n for n in notes)
    build_tn3k(tmp_path / "tn3k")
    assert any("trainval-image/" in n for n in generate("tn3k", tmp_path / "tn3k").notes)
    build_brainmri(tmp_path / "brainmri")
    assert "ignored folders: no/, yes/" in generate("brainmri", tmp_path / "brainmri").notes
    build_visa_pytorch(tmp_path / "visa")
    assert any("--split_csv" in n for n in generate("visa", tmp_path / "visa").notes)
    build_mvtec(tmp_path / "mvtec")
    (tmp_path / "mvtec/extra/test").mkdir(parents=True)
    assert any("extra/" in n for n in generate("mvtec", tmp_path / "mvtec").notes)


def test_classes_subset_on_purpose(tmp_path: Path) -> None:
    expected = build_mvtec(tmp_path)
    outcome = generate("mvtec", tmp_path, classes=["zipper", "bottle"])
    assert list(outcome.meta["test"]) == ["bottle", "zipper"]  # the published order, not the order asked
    assert rows(outcome.meta) == [r for r in expected if r[1] in ("bottle", "zipper")]
    assert any("left out by --classes" in n and "cable" in n for n in outcome.notes)


def test_visa_pytorch_with_an_explicit_split_csv(tmp_path: Path) -> None:
    expected = build_visa_pytorch_csv(tmp_path / "data")
    csv_path = tmp_path / "elsewhere/1cls.csv"
    csv_path.parent.mkdir()
    (tmp_path / "data/split_csv/1cls.csv").rename(csv_path)
    assert rows(generate("visa", tmp_path / "data", split_csv=csv_path).meta) == expected


def test_visa_as_shipped_with_the_csv_elsewhere(tmp_path: Path) -> None:
    expected = build_visa_csv(tmp_path / "data")
    csv_path = tmp_path / "1cls.csv"
    (tmp_path / "data/split_csv/1cls.csv").rename(csv_path)
    outcome = generate("visa", tmp_path / "data", split_csv=csv_path)
    assert "VisA as shipped" in outcome.layout and rows(outcome.meta) == expected


def test_check_keeps_a_valid_meta(tmp_path: Path) -> None:
    build_colondb(tmp_path)
    generate("cvc-colondb", tmp_path)
    before = (tmp_path / "meta.json").read_bytes()
    outcome = generate("cvc-colondb", tmp_path, check=True)
    assert not outcome.written and (tmp_path / "meta.json").read_bytes() == before


def test_all_formats_and_modes_pass(tmp_path: Path) -> None:
    for i, (ext, mode) in enumerate([(".png", "RGBA"), (".png", "P"), (".png", "LA"), (".bmp", "L"), (".tif", "RGB"),
                                     (".tiff", "L"), (".jpeg", "RGB"), (".JPG", "L")]):
        img(tmp_path / f"images/{i}{ext}", mode=mode)
        mask(tmp_path / f"masks/{i}.png")
    b = io.BytesIO()
    Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save(b, "PNG")
    (tmp_path / "images/16bit.png").write_bytes(b.getvalue())
    mask(tmp_path / "masks/16bit.png")
    assert len(generate("cvc-colondb", tmp_path).meta["test"]["colon"]) == 9


def test_mask_of_another_size_is_noted(tmp_path: Path) -> None:
    build_colondb(tmp_path)
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "masks/2.png")
    notes = generate("cvc-colondb", tmp_path).notes
    assert any("1 mask(s) differ in size" in n and "images/2.png is 8x8" in n and "16x16" in n for n in notes)


def _prefixed(prefix: str, expected: list[Row]) -> list[Row]:
    return [(s, c, f"{prefix}/{i}", f"{prefix}/{m}" if m else "", a) for s, c, i, m, a in expected]


@pytest.mark.parametrize("wrapper", ["VisA_pytorch", "download/VisA_pytorch"])
def test_visa_pytorch_found_below_the_folder_given(wrapper: str, tmp_path: Path) -> None:
    """``VisA_pytorch/1cls/CLASS/...`` two (or three) folders below the folder given, as unpacked."""
    expected = _prefixed(wrapper, build_visa_pytorch(tmp_path / wrapper))
    outcome = generate("visa", tmp_path)
    assert "VisA_pytorch" in outcome.layout and f"(in {wrapper}/1cls/)" in outcome.layout  # names the folder
    assert rows(outcome.meta) == expected
    assert all((tmp_path / s["img_path"]).is_file() for samples in outcome.meta["test"].values() for s in samples)


def test_visa_pytorch_below_the_folder_takes_the_split_csv_beside_it(tmp_path: Path) -> None:
    expected = _prefixed("VisA_pytorch", build_visa_pytorch_csv(tmp_path / "VisA_pytorch"))
    (tmp_path / "VisA_pytorch/split_csv").rename(tmp_path / "split_csv")  # the archive's CSV in the folder given
    outcome = generate("visa", tmp_path)
    assert rows(outcome.meta) == expected and any("split_csv/1cls.csv" in n for n in outcome.notes)


def test_nested_layouts_shallowest_first_and_two_at_one_depth_named(tmp_path: Path) -> None:
    expected = _prefixed("a/b", build_colondb(tmp_path / "one/a/b"))
    build_colondb(tmp_path / "one/a/b/c/d")  # deeper: not the one taken
    outcome = generate("cvc-colondb", tmp_path / "one")
    assert "(in a/b/)" in outcome.layout and rows(outcome.meta) == expected
    build_colondb(tmp_path / "two/x/first")
    build_colondb(tmp_path / "two/y/second")
    with pytest.raises(Exception, match=r"several sub-folders of .*, 2 level\(s\) down \(x/first/, y/second/\)"):
        generate("cvc-colondb", tmp_path / "two")
    build_colondb(tmp_path / "deep/1/2/3/4")
    with pytest.raises(Exception, match="nor in its sub-folders, up to 3 levels deep"):
        generate("cvc-colondb", tmp_path / "deep")
