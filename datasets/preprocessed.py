"""A ``meta.json`` that came with the download (the preprocessed sets the AdaCLIP repository distributes).

A ``meta.json`` beside a recognised tree that this generator did not write
(it lacks ``common.MARKER``) is accepted as it is, in its own class names and
order, and not rewritten, after checking: its structure (``train``/``test`` ->
class -> samples with the five keys), relative paths, no sample listed twice,
every test class non-empty, every anomalous sample of a set with masks paired
with a mask of its own name (image stem, or stem + ``_mask``, ``_label`` or
``_Segmentation``), and every image in the class folders' ``test/`` and
``train/`` sub-folders listed (a ``meta.json`` that misses files is stale).
The generator then decodes every listed file, as for a generated
``meta.json``. When the folder sits one level below the dataset folder, the
dataset folder gets a copy with the paths prefixed by that sub-folder.
``--rewrite`` lists the folders instead.
"""
from __future__ import annotations

import json
from pathlib import PurePosixPath

from crane.data.meta import DatasetError, check_sample
from datasets.common import Listing, Meta, Tree, child, image_files, subdirs

SPLITS = ("train", "test")
MASK_SUFFIXES = ("", "_mask", "_label", "_segmentation")
"""Mask stem = image stem + one of these (any case): the namings of every set this project reads."""


def validate(tree: Tree, masks_required: bool, origin: str = "as distributed",
             fix: str = "pass --rewrite to list the folders afresh instead") -> Listing:
    """Check ``tree.base/meta.json`` as described above; return it (re-rooted to ``tree.root``).

    ``masks_required``: every anomalous sample must list a mask (a set with pixel ground
    truth); ``origin`` words the report's note, ``fix`` the way out named in errors.
    """
    path = tree.base / "meta.json"
    shown = tree.rel(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {shown}: {e}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{shown}: malformed JSON ({e.msg} at line {e.lineno}); {fix}") from None
    if not isinstance(meta, dict) or any(not isinstance(meta.get(split), dict) for split in SPLITS):
        raise DatasetError(f"{shown}: expected an object with keys 'train' and 'test' mapping class names to "
                           f"sample lists; {fix}")
    meta = {split: meta[split] for split in SPLITS}  # other keys (e.g. common.MARKER) are not samples
    for split in SPLITS:
        seen: set[str] = set()
        for cls_name, samples in meta[split].items():
            if not isinstance(samples, list):
                raise DatasetError(f"{shown}: {split}/{cls_name} is not a list of samples; {fix}")
            for i, sample in enumerate(samples):
                where = f"{shown}: {split}/{cls_name}[{i}]"
                check_sample(sample, where, cls_name, fix, posix_paths=True)
                if sample["img_path"] in seen:
                    raise DatasetError(f"{where} lists {sample['img_path']} a second time; {fix}")
                seen.add(sample["img_path"])
                if sample["anomaly"] and masks_required and not sample["mask_path"]:
                    raise DatasetError(f"{where}: anomalous image {sample['img_path']} has no mask; {fix}")
                if sample["anomaly"] and sample["mask_path"]:
                    _check_pairing(sample, where, fix)
    if not meta["test"] or any(not samples for samples in meta["test"].values()):
        empty = next((c for c, s in meta["test"].items() if not s), None)
        raise DatasetError(f"{shown}: " + (f"test class {empty!r} has no samples" if empty else "no test classes")
                           + f"; {fix}")
    _check_complete(tree, meta, shown, fix)
    notes = [f"accepted {shown} {origin} ({sum(map(len, meta['test'].values()))} test samples, its own "
             "class names and order)" + ("; not rewritten" if tree.base == tree.root else "")]
    if tree.base != tree.root:
        meta = _prefixed(meta, PurePosixPath(tree.rel(tree.base)))
        notes.append(f"wrote a copy with paths prefixed by {tree.rel(tree.base)}/ as the dataset folder's meta.json")
    return Listing(meta, notes, accepted=tree.base == tree.root, repair=fix)


def _check_pairing(sample: dict, where: str, fix: str) -> None:
    image, mask = PurePosixPath(sample["img_path"]), sample["mask_path"]
    if PurePosixPath(mask).stem.lower() not in {(image.stem + s).lower() for s in MASK_SUFFIXES}:
        raise DatasetError(f"{where} pairs {image} with the mask {mask}, which is named for another image; {fix}")


def _check_complete(tree: Tree, meta: Meta, shown: str, fix: str) -> None:
    for split in SPLITS:
        listed = {s["img_path"] for samples in meta[split].values() for s in samples}
        for cls_name in meta[split]:
            for folder in subdirs(child(child(tree.base, cls_name), split)):
                for image in image_files(folder):
                    rel = image.relative_to(tree.base).as_posix()
                    if rel not in listed:
                        raise DatasetError(f"{tree.rel(image)} is not in {shown} ({split} split): the meta.json "
                                           f"does not match the folders; restore the missing files or {fix}")


def _prefixed(meta: Meta, prefix: PurePosixPath) -> Meta:
    def move(path: str) -> str:
        return (prefix / path).as_posix() if path else ""

    return {split: {cls_name: [{**s, "img_path": move(s["img_path"]), "mask_path": move(s["mask_path"])}
                               for s in samples] for cls_name, samples in classes.items()}
            for split, classes in meta.items() if split in SPLITS}
