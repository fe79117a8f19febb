"""``meta.json``: reading and checking the listing of a dataset folder (torch-free).

``meta.json`` maps each split (``train``, ``test``) to ``{class: [sample, ...]}``, each
sample ``{img_path, mask_path, cls_name, specie_name, anomaly}`` with paths relative to
the dataset folder (``datasets/README.md``). Every problem is one :class:`DatasetError`
line naming the file and the fix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from crane.errors import CraneError

SPLITS = ("train", "test")
SAMPLE_KEYS = {"img_path": str, "mask_path": str, "cls_name": str, "specie_name": str, "anomaly": int}


def default_datasets_root() -> str:
    """``$CRANE_DATASETS``, else ``./datasets/data``."""
    return os.environ.get("CRANE_DATASETS", os.path.join(".", "datasets", "data"))


class DatasetError(CraneError):
    """A dataset folder or its ``meta.json`` is missing, malformed or inconsistent."""


def _regenerate_hint(root: Path) -> str:
    return f"regenerate it with `python -m datasets.generate <dataset-key> {root}` (or `custom` for your own layout)"


def read_meta(root: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Read and check the structure of ``root/meta.json``; raise ``DatasetError`` when it is unusable."""
    meta_path = root / "meta.json"
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}; pass the folder the dataset archive was unpacked to")
    if not meta_path.is_file():
        raise DatasetError(f"{meta_path} not found; create it with `python -m datasets.generate <dataset-key> {root}` "
                           "(keys: mvtec visa mpdd btad sdd dtd dagm headct brainmri br35h isic tn3k cvc-colondb "
                           "cvc-clinicdb, or custom)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{meta_path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                           f"{_regenerate_hint(root)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {meta_path}: {e}; {_regenerate_hint(root)}") from None
    if not isinstance(meta, dict) or any(not isinstance(meta.get(split), dict) for split in SPLITS):
        found = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise DatasetError(f"{meta_path}: expected an object with keys 'train' and 'test' mapping class names "
                           f"to sample lists, found {found}; {_regenerate_hint(root)}")
    hint = _regenerate_hint(root)
    for split in SPLITS:
        for cls_name, samples in meta[split].items():
            if not isinstance(samples, list):
                raise DatasetError(f"{meta_path}: {split}/{cls_name} is not a list of samples; {hint}")
            for i, sample in enumerate(samples):
                check_sample(sample, f"{meta_path}: {split}/{cls_name}[{i}]", cls_name, hint)
    return meta


def check_sample(sample: Any, where: str, cls_name: str, fix: str, posix_paths: bool = False) -> None:
    """Raise :class:`DatasetError` unless ``sample`` is a well-formed ``meta.json`` sample of
    class ``cls_name`` with paths relative to the dataset folder. Messages start with
    ``where`` and end with ``fix``; ``posix_paths`` also rejects backslashes in the paths."""
    if not isinstance(sample, dict):
        raise DatasetError(f"{where} is not an object; {fix}")
    for key, kind in SAMPLE_KEYS.items():
        if key not in sample:
            raise DatasetError(f"{where} lacks the key '{key}'; {fix}")
        if not isinstance(sample[key], kind) or isinstance(sample[key], bool):
            raise DatasetError(f"{where}['{key}'] should be a {kind.__name__}, got {sample[key]!r}; {fix}")
    if sample["anomaly"] not in (0, 1):
        raise DatasetError(f"{where}['anomaly'] must be 0 or 1, got {sample['anomaly']!r}; {fix}")
    if sample["cls_name"] != cls_name:
        raise DatasetError(f"{where} has cls_name {sample['cls_name']!r} under class {cls_name!r}; {fix}")
    for key in ("img_path", "mask_path"):
        path = PurePosixPath(sample[key])
        if (path.is_absolute() or ".." in path.parts or (posix_paths and "\\" in sample[key])
                or (key == "img_path" and not sample[key])):
            raise DatasetError(f"{where}['{key}'] must be a path relative to the dataset folder, "
                               f"got {sample[key]!r}; {fix}")
