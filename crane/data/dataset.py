"""``CraneDataset``: the samples listed in a dataset folder's ``meta.json``.

``meta.json`` (written by ``python -m datasets.generate NAME ROOT``) maps each
split (``train``, ``test``) to ``{class: [sample, ...]}``; paths are relative to
the dataset folder (see ``datasets/README.md``). Everything that can go
wrong with the listing is checked before any model work and reported as one
``DatasetError`` line naming the file and the fix.

:func:`training_order` gives the samples the published ``train.py`` trains on
(its ``k_shot`` / ``portion`` selection); :class:`CraneDataset`'s own ``k_shot`` /
``portion`` are the test-time subset of our ``test.py`` (the published test ignores both).
"""
from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from crane.data.decode import Damaged, check_image, check_mask, quiet
from crane.data.image import load_mask, preprocess
from crane.data.meta import SAMPLE_KEYS, SPLITS, DatasetError, _regenerate_hint, read_meta

__all__ = ["CraneDataset", "DatasetError", "SAMPLE_KEYS", "SPLITS", "read_meta"]

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
        preprocessing: ``crane`` or ``published`` (:data:`crane.data.image.PREPROCESSING`).

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
        preprocessing: str = "crane",
    ) -> None:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if k_shot < 0:
            raise DatasetError(f"k_shot must be >= 0, got {k_shot}")
        if not 0.0 < portion <= 1.0:
            raise DatasetError(f"portion must be in (0, 1], got {portion}")
        self.root = Path(root)
        self.preprocessing = preprocessing
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
        Decoding is complete (:mod:`crane.data.decode`: containers checked, every pixel decoded), so a
        truncated file of any format is found here. Raises ``DatasetError`` naming the first bad file
        and the fix.
        """
        with quiet():
            for sample in self.samples if indices is None else (self.samples[i] for i in indices):
                for key, kind in (("img_path", "image"), ("mask_path", "mask")):
                    if not sample[key]:
                        continue
                    path = self.root / sample[key]
                    if not path.is_file():
                        raise DatasetError(f"{kind} file not found: {path} (listed in {self.meta_path}); restore it "
                                           f"from the dataset archive or {_regenerate_hint(self.root)}")
                    if decode:
                        self._check_decodes(path, kind)

    def _check_decodes(self, path: Path, kind: str) -> None:
        try:
            (check_image if kind == "image" else check_mask)(path)
        except Damaged as e:
            raise DatasetError(f"unreadable {kind} {path} ({e}); replace it with an intact copy from the dataset "
                               f"archive or delete it and {_regenerate_hint(self.root)}") from None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        # As published, a normal sample's mask is empty whatever meta.json lists for it.
        mask_path = sample["mask_path"] if sample["anomaly"] else ""
        return {
            "img": preprocess(self.root / sample["img_path"], self.image_size, self.preprocessing),
            "img_mask": load_mask(self.root / mask_path if mask_path else None, self.image_size),
            "cls_name": sample["cls_name"],
            "specie_name": sample["specie_name"],
            "anomaly": int(sample["anomaly"]),
            "img_path": sample["img_path"],
            "has_mask": bool(mask_path),
        }


def training_order(parts: Sequence[CraneDataset], k_shot: int = 0, portion: float = 1.0, seed: int = 111
                   ) -> list[tuple[int, int]]:
    """The training samples of the published ``train.py`` over several datasets, in its order.

    Returns ``(dataset number, sample index)`` pairs into ``parts``. Classes are merged by name
    across the datasets, in the order they are first met (``meta.json`` order); a class lists
    the samples of each dataset in turn. Unless ``k_shot == 0`` and ``portion == 1``, each class
    keeps, with ``k_shot > 0``, ``min(k_shot // 2, n)`` of its ``n`` normal samples and as many
    of its anomalous ones (``portion`` is then ignored), else ``int(n * portion)`` of each label.
    The picks are ``random.Random(seed).sample`` draws, class by class, normal before anomalous,
    and the kept samples are listed in the order drawn: the published stream, which samples with
    the global ``random`` right after seeding it with ``--seed``.
    """
    merged: dict[str, list[tuple[int, int]]] = {}
    for number, part in enumerate(parts):
        for index, sample in enumerate(part.samples):
            merged.setdefault(sample["cls_name"], []).append((number, index))
    if k_shot == 0 and portion == 1.0:
        return [item for items in merged.values() for item in items]
    rng = random.Random(seed)
    kept: list[tuple[int, int]] = []
    for items in merged.values():
        by_label = [[it for it in items if parts[it[0]].samples[it[1]]["anomaly"] == label] for label in (0, 1)]
        for group in by_label:
            count = min(k_shot // 2, len(group)) if k_shot > 0 else int(len(group) * portion)
            kept.extend(group[j] for j in rng.sample(range(len(group)), count))
    return kept
