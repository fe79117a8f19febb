"""DAGM 2007 as distributed: ``ClassK/{Train,Test}/NNNN.PNG`` with ``ClassK/{Train,Test}/Label/NNNN_label.PNG``.

(Also accepted one level deeper, ``ClassK/ClassK/{Train,Test}``, as some
re-uploads nest it.) An image is defective iff its label file exists (matched by
name, any case and image extension). ``Label/Labels.txt``, when present, is read
too (a header line, then tab-separated ``index, defective 0/1, image name, 0,
label name``) and must agree with the label files: a defective image without a
label file, or a label the list calls defect-free, is an error. A label file
with no image is an error. Classes are ``Class1`` .. ``Class10`` in that order
(the published list; the development set's ``ClassK_def`` folders are not
classes). ``Test`` gives the test split: its defect-free images in name order,
then its defective ones in label name order, as the published generator lists
them (it leaves the defect-free order to a Python set; name order is the
deterministic choice). ``Train`` gives the train split with its defect-free
images only. Normal samples get ``specie_name`` ``good``, defective ones
``anomaly``.
"""
from __future__ import annotations

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
    missing_class,
    nonempty_images,
    wanted_classes,
)

KEY = "dagm"
CLASSES = tuple(f"Class{k}" for k in range(1, 11))
SUFFIX = "_label"


def _class_dir(base: Path, cls_name: str) -> Path | None:
    for folder in (child(base, cls_name), child(child(base, cls_name), cls_name)):
        if _has_exact(folder, "Test"):
            return folder
    return None


def _has_exact(folder: Path, name: str) -> bool:
    """``folder/name`` exists with exactly this case (``Test`` is DAGM's, ``test`` a converted tree's)."""
    return folder.is_dir() and name in {p.name for p in folder.iterdir() if p.is_dir()}


def listing(tree: Tree, request: Request) -> Listing:
    """List DAGM as distributed."""
    wanted = wanted_classes(KEY, CLASSES, request)
    train: list[Sample] = []
    test: list[Sample] = []
    left_out_defects = 0
    for cls_name in wanted:
        cls_dir = _class_dir(tree.base, cls_name)
        if cls_dir is None:
            raise missing_class(KEY, cls_name, f"{tree.rel(tree.base / cls_name)}/Test/", request)
        if _has_exact(cls_dir, "Train"):
            samples = _split(tree, cls_dir, "Train", cls_name)
            train += [s for s in samples if s["anomaly"] == 0]
            left_out_defects += sum(s["anomaly"] for s in samples)
        test += _split(tree, cls_dir, "Test", cls_name)
    notes = [f"train split: defect-free images only ({left_out_defects} defective training images left out)"] \
        if left_out_defects else []
    return Listing(build_meta(tree, train, test, wanted), notes)


def _split(tree: Tree, cls_dir: Path, split: str, cls_name: str) -> list[Sample]:
    folder = cls_dir / split
    images = nonempty_images(folder, tree, f"{split} images of {cls_name}")
    label_dir = child(folder, "Label")
    pairer = Pairer(tree, (SUFFIX,), lambda image: f"{tree.rel(label_dir)}/{image.stem}{SUFFIX}.PNG")
    listed = _read_labels_txt(tree, label_dir)
    normal: list[Sample] = []
    defective: list[tuple[str, Sample]] = []
    for image in images:
        label = pairer.mask(image, [label_dir], required=False)
        flag = listed.get(image.name.lower())
        if flag is not None and flag != (label is not None):
            raise DatasetError(
                f"{tree.rel(label_dir)}/Labels.txt calls {tree.rel(image)} "
                + ("defective but its label file is missing: expected "
                   f"{tree.rel(label_dir)}/{image.stem}{SUFFIX}.PNG" if flag else
                   f"defect-free but {tree.rel(label)} exists") + f"; {RESTORE}")
        if label is None:
            normal.append(tree.sample(image, None, cls_name, "good", 0))
        else:
            defective.append((label.name, tree.sample(image, label, cls_name, "anomaly", 1)))
    pairer.check_all_used([label_dir], f"a label is named IMAGE{SUFFIX}.PNG")
    return normal + [s for _, s in sorted(defective, key=lambda pair: pair[0])]


def _read_labels_txt(tree: Tree, label_dir: Path) -> dict[str, bool]:
    """``Labels.txt`` as ``{image name (lower case): defective}``; empty when the file is absent."""
    path = child(label_dir, "Labels.txt")
    if not path.is_file():
        return {}
    flags: dict[str, bool] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        fields = line.split()
        if len(fields) < 3:
            continue  # the header line (a count) or a blank line
        if fields[1] not in ("0", "1"):
            raise DatasetError(f"{tree.rel(path)} line {line_no}: the second field must be 0 or 1, got "
                               f"{fields[1]!r}; {RESTORE}")
        flags[fields[2].lower()] = fields[1] == "1"
    return flags


LAYOUT = Layout("DAGM 2007 as distributed: ClassK/{Train,Test}/NNNN.PNG with Label/NNNN_label.PNG",
                lambda base: any(_class_dir(base, c) for c in CLASSES), listing)
