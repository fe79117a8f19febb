"""Write a dataset folder's ``meta.json`` from its files as the archive unpacks.

Usage::

    python -m datasets.generate NAME ROOT [--classes C ...] [--split_csv FILE] [--check] [--rewrite]

(``--split-csv``, the hyphen spelling, is accepted too.)

NAME is a dataset key (mvtec visa mpdd btad sdd dtd dagm headct brainmri br35h
isic tn3k cvc-colondb cvc-clinicdb) or ``custom``; ROOT is the folder the
archive was unpacked to (its content may also sit up to three folders below ROOT, such as
``VisA_pytorch/1cls/``: the report names the folder found).
The layout is recognised by itself and named in the report; the layouts of
every dataset are in ``datasets/README.md``. Every defect image is paired with
its mask by name, every image and mask is decoded completely, then
``ROOT/meta.json`` is written atomically (classes and samples in the published
order) and a per-class count table printed. A ``meta.json`` that came with the
download (AdaCLIP's preprocessed folders) is checked and kept as it is. On a
problem it prints one line naming the file and the fix and exits with status 2,
leaving ``meta.json`` as it was.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crane.data.meta import DatasetError
from datasets import custom, dagm, kolektor, mvtec_like, visa
from datasets.common import (
    Layout,
    Listing,
    Meta,
    Request,
    Tree,
    check_files,
    count_table,
    generated_here,
    subdirs,
    write_meta,
)
from datasets.medical import headct_labels_layout, image_mask_layout, no_yes_layout
from datasets.mvtec_like import ALL_ANOMALOUS, IMAGE_ONLY, Style, fixed_layout
from datasets.preprocessed import validate


@dataclass(frozen=True)
class Dataset:
    """One dataset key and the layouts its archives unpack to (tried in order; each knows its class list)."""

    key: str
    layouts: tuple[Layout, ...]
    masks_required: bool = True
    """Every anomalous image has a pixel mask (checked by ``--check``)."""


def _adaclip(key: str, folder: str, style: Style) -> Layout:
    """AdaCLIP's preprocessed folder (its ``meta.json``, when present, is kept: see ``datasets.preprocessed``)."""
    return fixed_layout(f"AdaCLIP preprocessed folder: {folder}/{{train,test,ground_truth}}/", key, (folder,), style)


def _pranet(name: str) -> Layout:
    """PraNet's polyp test sets (``Polyp DataSet.zip`` on figshare, as AnomalyCLIP links it)."""
    return image_mask_layout(f"PraNet's polyp test sets: TestDataset/{name}/{{images,masks}}/",
                             f"TestDataset/{name}/images", f"TestDataset/{name}/masks", "colon", ".png")


MVTEC_CLASSES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
                 "tile", "toothbrush", "transistor", "wood", "zipper")
MPDD_CLASSES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
BTAD_CLASSES = ("01", "02", "03")
DTD_CLASSES = ("Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068", "Woven_125",
               "Marbled_078", "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069")  # the published order
MVTEC_TREE = "CLASS/{train/good,test/{good,DEFECT},ground_truth/DEFECT/NAME_mask.png}"
ISIC_DATA, ISIC_TRUTH = "ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth"
ISIC_STYLE = Style(needs_normal=False, mask_suffixes=("_Segmentation", "_mask", ""), flat_masks=True)

DATASETS: dict[str, Dataset] = {d.key: d for d in (
    Dataset("mvtec",
            (fixed_layout(f"MVTec AD archive: {MVTEC_TREE}", "mvtec", MVTEC_CLASSES, mvtec_like.MVTEC),)),
    Dataset("visa", visa.LAYOUTS),
    Dataset("mpdd",
            (fixed_layout(f"MPDD archive: {MVTEC_TREE}", "mpdd", MPDD_CLASSES, mvtec_like.MVTEC),)),
    Dataset("btad", (fixed_layout(
        "BTAD archive (BTech_Dataset_transformed): CLASS/{train/ok,test/{ok,ko},ground_truth/ko/NAME.png|.bmp}",
        "btad", BTAD_CLASSES, mvtec_like.BTAD),)),
    Dataset("sdd", (
        _adaclip("sdd", "SDD", mvtec_like.SDD),
        fixed_layout("KolektorSDD converted to the MVTec layout: electrical commutators/{train,test,ground_truth}/",
                     "sdd", (kolektor.CLASS,), mvtec_like.SDD, folders={kolektor.CLASS: ("electrical_commutators",)}),
        kolektor.LAYOUT)),
    Dataset("dtd", (fixed_layout(f"DTD-Synthetic archive: {MVTEC_TREE}", "dtd", DTD_CLASSES, mvtec_like.DTD),)),
    Dataset("dagm", (
        fixed_layout("AdaCLIP preprocessed folder: ClassK/{train,test,ground_truth}/", "dagm", dagm.CLASSES,
                     Style(mask_suffixes=("_label", "_mask", "")), marks=("ground_truth",)),
        dagm.LAYOUT)),
    Dataset("headct", (
        _adaclip("headct", "headct", IMAGE_ONLY),
        fixed_layout("MVTec-style tree: brain/test/{good,DEFECT}/", "headct", ("brain",), IMAGE_ONLY),
        headct_labels_layout("brain")), masks_required=False),
    Dataset("brainmri", (
        _adaclip("brainmri", "brain_mri", IMAGE_ONLY),
        no_yes_layout("Kaggle archive: brain_tumor_dataset/{no,yes}/", "brain_tumor_dataset", "brain"),
        no_yes_layout("no/, yes/ at the top", None, "brain")), masks_required=False),
    Dataset("br35h", (
        _adaclip("br35h", "br35h", IMAGE_ONLY),
        no_yes_layout("brain/{no,yes}/ (the published generator's tree)", "brain", "brain"),
        no_yes_layout("Kaggle archive: no/, yes/, pred/ at the top", None, "brain")), masks_required=False),
    Dataset("isic", (
        _adaclip("isic", "isic", Style(needs_normal=False, mask_suffixes=ISIC_STYLE.mask_suffixes)),
        fixed_layout("MVTec-style tree: skin/test/DEFECT/ with skin/ground_truth/NAME_Segmentation.png", "isic",
                     ("skin",), ISIC_STYLE, marks=("ground_truth",)),
        fixed_layout(f"AnomalyCLIP's tree: skin/test/DEFECT/ with skin/{ISIC_TRUTH}/", "isic", ("skin",),
                     Style(needs_normal=False, mask_suffixes=ISIC_STYLE.mask_suffixes, masks=ISIC_TRUTH,
                           flat_masks=True), marks=(ISIC_TRUTH,)),
        image_mask_layout(f"ISIC 2016 test archives: {ISIC_DATA}/ and {ISIC_TRUTH}/NAME_Segmentation.png",
                          ISIC_DATA, ISIC_TRUTH, "skin", ".png", ("_Segmentation",)))),
    Dataset("tn3k", (
        _adaclip("tn3k", "tn3k", ALL_ANOMALOUS),
        image_mask_layout("TN3K as distributed: test-image/NNNN.jpg with test-mask/NNNN.jpg", "test-image",
                          "test-mask", "thyroid", ".jpg"))),
    Dataset("cvc-colondb", (
        _adaclip("cvc-colondb", "ColonDB", ALL_ANOMALOUS),
        image_mask_layout("images/ with masks/ of the same names", "images", "masks", "colon", ".png"),
        _pranet("CVC-ColonDB"),
        image_mask_layout("Original/ with 'Ground Truth'/ of the same names", "Original", "Ground Truth", "colon",
                          ".tif"))),
    Dataset("cvc-clinicdb", (
        _adaclip("cvc-clinicdb", "ClinicDB", ALL_ANOMALOUS),
        image_mask_layout("images/ with masks/ of the same names (PNG conversion)", "images", "masks", "colon",
                          ".png"),
        _pranet("CVC-ClinicDB"),
        image_mask_layout("CVC-ClinicDB as distributed: Original/N.tif with 'Ground Truth'/N.tif", "Original",
                          "Ground Truth", "colon", ".tif"))),
    Dataset("custom", (custom.LAYOUT,), masks_required=False),
)}


@dataclass
class Outcome:
    """What ``generate`` did."""

    meta: Meta
    layout: str
    notes: list[str]
    written: bool
    """False when an existing ``meta.json`` was accepted as it is."""


SEARCH_DEPTH = 3
"""How many folders below ROOT a layout is looked for: the deepest nesting of a distributed form is two
(``VisA_pytorch/1cls/CLASS``); one more allows for a download's own top folder around it."""


def find_layout(dataset: Dataset, root: Path) -> tuple[Layout, Tree]:
    """The first layout of ``dataset`` found in ``root``, else at the shallowest depth below it (up to
    :data:`SEARCH_DEPTH` folders) where exactly one folder holds one."""
    level = [root]
    for depth in range(SEARCH_DEPTH + 1):
        hits: list[tuple[Layout, Path]] = []
        for folder in level:
            found = next((layout for layout in dataset.layouts if layout.detect(folder)), None)
            if found is not None:
                hits.append((found, folder))
        if len(hits) == 1:
            layout, base = hits[0]
            return layout, Tree(root, base)
        if hits:
            shown = ", ".join(base.relative_to(root).as_posix() + "/" for _, base in hits)
            raise DatasetError(f"found {dataset.key} in several sub-folders of {root}, {depth} level(s) down "
                               f"({shown}); pass the one to use as ROOT")
        level = [sub for folder in level for sub in subdirs(folder)]
    accepted = "; ".join(layout.name for layout in dataset.layouts)
    raise DatasetError(f"no {dataset.key} layout found in {root} (nor in its sub-folders, up to {SEARCH_DEPTH} "
                       f"levels deep); expected one of: {accepted}")


def generate(name: str, root: str | os.PathLike[str], classes: Sequence[str] | None = None,
             split_csv: str | os.PathLike[str] | None = None, check: bool = False, rewrite: bool = False,
             progress: bool = False) -> Outcome:
    """List, pair and decode dataset ``name`` in ``root`` and write ``root/meta.json``.

    ``classes`` generates a subset of a fixed class list; ``split_csv`` is VisA's
    ``1cls.csv`` for the ``VisA_pytorch`` form. A ``meta.json`` found beside the tree
    that this generator did not write is validated and kept as it is, unless
    ``rewrite``; ``check`` validates ``root/meta.json`` whoever wrote it. Raises
    ``DatasetError`` (one line naming the file and the fix) on any problem;
    ``meta.json`` is then left as it was.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; use one of {' '.join(DATASETS)}")
    dataset = DATASETS[name]
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}; pass the folder the {name} archive unpacked to")
    try:
        request = Request(tuple(classes) if classes is not None else None,
                          Path(split_csv) if split_csv is not None else None, rewrite)
        if request.split_csv is not None and not request.split_csv.is_file():
            raise DatasetError(f"--split_csv: file not found: {request.split_csv}")
        layout_name, listing = _listing(dataset, root, request, check)
        try:
            notes = listing.notes + check_files(root, listing.meta, progress=progress)
        except DatasetError as e:
            raise DatasetError(f"{e}; or {listing.repair}" if listing.repair else str(e)) from None
        if not listing.accepted:
            write_meta(root, listing.meta, name)
    except DatasetError as e:
        raise DatasetError(f"{name} dataset in {root}: {e}") from None
    return Outcome(listing.meta, layout_name, notes, not listing.accepted)


def _listing(dataset: Dataset, root: Path, request: Request, check: bool) -> tuple[str, Listing]:
    """The layout's name and its listing: the folders listed, or a ``meta.json`` from elsewhere kept."""
    if check:
        if not (root / "meta.json").is_file():
            raise DatasetError(f"--check: {root / 'meta.json'} not found; run without --check to write it")
        return "existing meta.json (--check)", validate(Tree(root, root), dataset.masks_required, "as it is",
                                                        "run without --check to list the folders afresh")
    try:
        layout, tree = find_layout(dataset, root)
    except DatasetError:
        if (root / "meta.json").is_file() and not request.rewrite and not generated_here(root / "meta.json"):
            return "no known tree, but a meta.json that came with the download", validate(
                Tree(root, root), dataset.masks_required)
        raise
    name = layout.name + (f" (in {tree.rel(tree.base)}/)" if tree.base != root else "")
    found = tree.base / "meta.json"
    if found.is_file() and not request.rewrite and not generated_here(found):
        if request.classes is not None:
            raise DatasetError(f"--classes does not apply to {tree.rel(found)}, which came with the download and is "
                               "kept as it is; pass --rewrite too to list the folders instead")
        return name, validate(tree, dataset.masks_required)
    return name, layout.read(tree, request)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (2 on a dataset problem)."""
    parser = argparse.ArgumentParser(prog="python -m datasets.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", metavar="NAME", help=f"dataset key: {' '.join(DATASETS)}")
    parser.add_argument("root", type=Path, metavar="ROOT", help="the dataset folder (where the archive unpacked)")
    parser.add_argument("--classes", nargs="+", metavar="CLASS",
                        help="generate only these classes (on purpose: a missing class is otherwise an error)")
    parser.add_argument("--split_csv", "--split-csv", type=Path, metavar="FILE",
                        help="VisA's split_csv/1cls.csv, to list the VisA_pytorch form in the published order")
    parser.add_argument("--check", action="store_true",
                        help="validate the existing ROOT/meta.json as it is (paths, pairing, files) and keep it")
    parser.add_argument("--rewrite", action="store_true",
                        help="list the folders even when a meta.json that came with the download is present")
    args = parser.parse_args(argv)
    try:
        outcome = generate(args.name, args.root, args.classes, args.split_csv, args.check, args.rewrite,
                           progress=True)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.name}: layout {outcome.layout}")
    for note in outcome.notes:
        print(f"note: {note}")
    print(count_table(outcome.meta))
    print(f"wrote {args.root / 'meta.json'}" if outcome.written else f"kept {args.root / 'meta.json'} as it is")
    return 0


if __name__ == "__main__":
    sys.exit(main())
