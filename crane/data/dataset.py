"""``CraneDataset``: the samples listed in a dataset folder's ``meta.json``.

``meta.json`` (written by ``python -m datasets.generate NAME ROOT``) maps each
split (``train``, ``test``) to ``{class: [sample, ...]}``; paths are relative to
the dataset folder (see ``shared/spec/datasets.md``). Everything that can go
wrong with the listing is checked before any model work and reported as one
``DatasetError`` line naming the file and the fix.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from crane.data.image import ImageReadError, load_mask, load_rgb, preprocess

SPLITS = ("train", "test")
SAMPLE_KEYS = {"img_path": str, "mask_path": str, "cls_name": str, "specie_name": str, "anomaly": int}


class DatasetError(ValueError):
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
    for split in SPLITS:
        for cls_name, samples in meta[split].items():
            if not isinstance(samples, list):
                raise DatasetError(f"{meta_path}: {split}/{cls_name} is not a list of samples; "
                                   f"{_regenerate_hint(root)}")
            for i, sample in enumerate(samples):
                _check_sample(sample, f"{split}/{cls_name}[{i}]", cls_name, meta_path)
    return meta


def _check_sample(sample: Any, where: str, cls_name: str, meta_path: Path) -> None:
    hint = _regenerate_hint(meta_path.parent)
    if not isinstance(sample, dict):
        raise DatasetError(f"{meta_path}: {where} is not an object; {hint}")
    for key, kind in SAMPLE_KEYS.items():
        if key not in sample:
            raise DatasetError(f"{meta_path}: {where} lacks the key '{key}'; {hint}")
        if not isinstance(sample[key], kind) or isinstance(sample[key], bool):
            raise DatasetError(f"{meta_path}: {where}['{key}'] should be a {kind.__name__}, "
                               f"got {sample[key]!r}; {hint}")
    if sample["anomaly"] not in (0, 1):
        raise DatasetError(f"{meta_path}: {where}['anomaly'] must be 0 or 1, got {sample['anomaly']!r}; {hint}")
    if sample["cls_name"] != cls_name:
        raise DatasetError(f"{meta_path}: {where} has cls_name {sample['cls_name']!r} under class {cls_name!r}; {hint}")
    for key in ("img_path", "mask_path"):
        path = PurePosixPath(sample[key])
        if path.is_absolute() or ".." in path.parts or (key == "img_path" and not sample[key]):
            raise DatasetError(f"{meta_path}: {where}['{key}'] must be a path relative to the dataset folder, "
                               f"got {sample[key]!r}; {hint}")


def _keep(n: int, count: int, rng: random.Random) -> list[int]:
    """Indices of ``count`` of ``n`` items picked with ``rng``, in their original order."""
    return sorted(rng.sample(range(n), min(count, n)))


class CraneDataset(Dataset):
    """Samples of one split of a dataset folder, as listed in its ``meta.json``.

    Args:
        root: the dataset folder (holding ``meta.json``).
        split: ``"test"`` (evaluation, and training on an auxiliary set) or ``"train"``.
        image_size: side of the square CLIP input and mask.
        k_shot: when > 0, keep ``k_shot`` samples per class (all of them if the class has fewer).
        portion: when < 1, keep this fraction of each class (at least one sample), applied before ``k_shot``.
        classes: a class name or names to keep; ``None`` keeps every class of the split.
        seed: seed of the ``k_shot`` / ``portion`` selection; each class draws from its own
            generator seeded with ``(seed, class name)``, so a class keeps the same samples
            whatever other classes are requested.
        validate: check that every listed image and mask file exists (see ``validate``).

    Items are dicts: ``img`` (``3 x S x S`` float32, CLIP-normalised), ``img_mask``
    (``S x S`` float32 of {0, 1}), ``cls_name``, ``specie_name``, ``anomaly`` (int),
    ``img_path`` (relative, as in ``meta.json``) and ``has_mask`` (bool).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "test",
        image_size: int = 518,
        k_shot: int = 0,
        portion: float = 1.0,
        classes: str | Sequence[str] | None = None,
        seed: int = 111,
        validate: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if k_shot < 0:
            raise DatasetError(f"k_shot must be >= 0, got {k_shot}")
        if not 0.0 < portion <= 1.0:
            raise DatasetError(f"portion must be in (0, 1], got {portion}")
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.meta_path = self.root / "meta.json"
        listing = read_meta(self.root)[split]
        self._classes = self._resolve_classes(listing, classes)
        self.samples: list[dict[str, Any]] = []
        for cls_name in self._classes:
            samples = listing[cls_name]
            rng = random.Random(f"{seed}/{cls_name}")
            if portion < 1.0:
                samples = [samples[i] for i in _keep(len(samples), max(1, round(portion * len(samples))), rng)]
            if k_shot > 0:
                samples = [samples[i] for i in _keep(len(samples), k_shot, rng)]
            self.samples.extend(samples)
        if validate:
            self.validate()

    def _resolve_classes(self, listing: dict[str, list[dict[str, Any]]],
                         classes: str | Sequence[str] | None) -> list[str]:
        available = sorted(listing)
        if not available:
            raise DatasetError(f"{self.meta_path}: the '{self.split}' split lists no classes"
                               + ("; zero-shot sets have no training images: train on the 'test' split of an "
                                  "auxiliary dataset" if self.split == "train" else f"; {_regenerate_hint(self.root)}"))
        requested = [classes] if isinstance(classes, str) else available if classes is None else list(classes)
        for cls_name in requested:
            if cls_name not in listing:
                raise DatasetError(f"unknown class {cls_name!r} in the '{self.split}' split of {self.meta_path}; "
                                   f"available: {', '.join(available)}")
            if not listing[cls_name]:
                raise DatasetError(f"{self.meta_path}: class {cls_name!r} has no samples in the '{self.split}' "
                                   f"split; check its folder and {_regenerate_hint(self.root)}")
        wanted = set(requested)
        return [c for c in listing if c in wanted]  # meta.json order, as the published loader keeps it

    @property
    def classes(self) -> list[str]:
        """The classes of this dataset, in ``meta.json`` order."""
        return list(self._classes)

    def validate(self, decode: bool = False, indices: Sequence[int] | None = None) -> None:
        """Check that every image and mask file of the kept samples (or of the samples ``indices``)
        exists (and decodes, if ``decode``).

        ``meta.json`` itself (existence, JSON syntax, keys, value types) and the requested
        classes (known, non-empty) are checked when the dataset is built, before this.
        Raises ``DatasetError`` naming the first bad file and the fix.
        """
        for sample in self.samples if indices is None else (self.samples[i] for i in indices):
            for key, kind in (("img_path", "image"), ("mask_path", "mask")):
                if not sample[key]:
                    continue
                path = self.root / sample[key]
                if not path.is_file():
                    raise DatasetError(f"{kind} file not found: {path} (listed in {self.meta_path}); restore it from "
                                       f"the dataset archive or {_regenerate_hint(self.root)}")
                if decode:
                    self._check_decodes(path, kind)

    def _check_decodes(self, path: Path, kind: str) -> None:
        try:
            if kind == "image":
                load_rgb(path)
            else:
                with Image.open(path) as img:
                    img.load()
        except (ImageReadError, OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"unreadable {kind} {path} ({e}); replace it with an intact copy from the dataset "
                               f"archive or delete it and {_regenerate_hint(self.root)}") from None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        # As published, a normal sample's mask is empty whatever meta.json lists for it.
        mask_path = sample["mask_path"] if sample["anomaly"] else ""
        return {
            "img": preprocess(self.root / sample["img_path"], self.image_size),
            "img_mask": load_mask(self.root / mask_path if mask_path else None, self.image_size),
            "cls_name": sample["cls_name"],
            "specie_name": sample["specie_name"],
            "anomaly": int(sample["anomaly"]),
            "img_path": sample["img_path"],
            "has_mask": bool(mask_path),
        }
