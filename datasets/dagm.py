"""DAGM 2007: ``ClassK/{Train,Test}/NNNN.PNG`` with masks ``ClassK/{Train,Test}/Label/NNNN_label.PNG``.

An image is defective iff its label file exists (matched by name, any case and
image extension; other files in ``Label/``, such as ``Labels.txt``, are ignored).
A label file with no image is an error. Class folders are the sub-folders of
ROOT holding a ``Test`` folder (so the defect-only ``ClassK_def`` folders of the
development set are skipped). ``Test`` gives the test split; ``Train`` gives the
train split with its normal images only (the train split holds normal reference
images; DAGM's defective training images are left out). Normal samples get
``specie_name`` ``good``, defective ones ``anomaly``.
"""
from __future__ import annotations

from pathlib import Path

from crane.data.dataset import DatasetError
from datasets.common import RESTORE, Meta, Sample, build_meta, find_mask, image_files, rel, sample, stem_index, subdirs

SUFFIX = "_label"


def generate(root: Path) -> Meta:
    """List a DAGM dataset folder."""
    class_dirs = [d for d in subdirs(root) if (d / "Test").is_dir()]
    if not class_dirs:
        raise DatasetError(f"no class folder with a Test/ folder under {root} (expected {root}/Class1/Test/...); "
                           "is it the folder the dataset archive unpacked to?")
    train: list[Sample] = []
    test: list[Sample] = []
    for cls_dir in class_dirs:
        train += [s for s in _split(root, cls_dir, "Train") if s["anomaly"] == 0]
        samples = _split(root, cls_dir, "Test")
        if not samples:
            raise DatasetError(f"no images in {rel(cls_dir / 'Test', root)}; restore the class from the dataset "
                               "archive or delete its folder")
        test += samples
    return build_meta(root, train, test)


def _split(root: Path, cls_dir: Path, split: str) -> list[Sample]:
    folder = cls_dir / split
    images = image_files(folder)
    labels = stem_index(image_files(folder / "Label"), root)
    names = {image.stem.lower() + SUFFIX for image in images}
    for key, path in labels.items():
        if key not in names:
            raise DatasetError(f"label {rel(path, root)} matches no image in {rel(folder, root)} (a label is named "
                               f"IMAGE{SUFFIX}.PNG); {RESTORE}")
    samples = []
    for image in images:
        label = find_mask(image, labels, (SUFFIX,))
        samples.append(sample(root, image, label, cls_dir.name, "anomaly" if label else "good", int(label is not None)))
    return samples
