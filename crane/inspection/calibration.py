"""Picking the image and pixel thresholds of ``python -m crane calibrate``.

Two ways:

* **labelled images** (normal and defect images): the image threshold maximising F1
  (or Youden's J) and the pixel threshold maximising F1 over the pixels of the images
  whose ground truth is known (:mod:`crane.inspection.thresholds`);
* **a false-alarm rate on normal images** (``--target_fpr``): the thresholds that flag
  that fraction of the normal images, and of their pixels.

False-alarm statistics. With ``n`` normal calibration scores and the threshold at the
``k``-th largest of them (rule: anomalous when ``score >= t``), ``k`` calibration images
are flagged. For a new normal image from the same distribution (continuous scores),
the chance of a false alarm, ``P(score >= t)``, varies with the calibration set as
``Beta(k, n + 1 - k)`` (the exceedance probability of the ``k``-th largest of ``n``
exchangeable draws): its mean is ``k / (n + 1)``. The largest ``k`` with
``k / (n + 1) <= target`` is used, so the expected rate is at most the target; the
interval is the Beta's central 95%. When ``n + 1 < 1 / target`` even ``k = 1`` (the
highest score) expects more than the target: the threshold is then the highest score,
and the report says how many images the target needs. Tied scores: the threshold moves
up to the next distinct score, so never more than ``k`` calibration images are flagged.

Pixels: the same rule on the values of the normal images' maps, with
``k = floor(target * N)`` of their ``N`` pixels (no interval: the pixels of an image are
correlated, not independent draws).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from crane.errors import CraneError
from crane.inspection.thresholds import confusion, max_f1_threshold, youden_threshold

CONFIDENCE = 0.95
_EPS = 1e-9  # so that target * (n + 1) = 7.000000000000001 or 6.999999999999999 both give k = 7


# ------------------------------------------------------------------------------ statistics


def _flag_at_most(top: np.ndarray, k: int, complete: bool) -> float:
    """The lowest threshold flagging at most ``k`` values (``value >= t``) given the largest values ``top``
    (sorted descending; ``complete``: ``top`` holds every value, else only the largest ones)."""
    if k <= 0 or top.size == 0:
        return float(np.nextafter(top[0], np.inf)) if top.size else math.inf
    t = top[min(k, top.size) - 1]
    flagged = int(np.count_nonzero(top >= t))
    if flagged <= k and (complete or top[-1] < t):
        return float(t)
    higher = top[top > t]  # a tie run crosses position k: move up to the next distinct value
    return float(higher[-1]) if higher.size else float(np.nextafter(top[0], np.inf))


def images_needed(target: float) -> int:
    """The fewest normal images for which a threshold can expect a false-alarm rate <= ``target``."""
    return max(1, math.ceil(1.0 / target - _EPS) - 1)


@dataclass(frozen=True)
class FalseAlarmThreshold:
    """An image threshold set from ``n`` normal scores at a target false-alarm rate.

    ``flagged`` calibration images have ``score >= threshold``; ``expected`` is the mean
    false-alarm rate on new normal images, ``interval`` its central ``confidence`` range
    (Beta(a, b) with ``a = max(flagged, 1)``, ``b = n + 1 - a``); ``reached``: whether
    ``expected <= target``.
    """

    threshold: float
    target: float
    n: int
    flagged: int
    expected: float
    interval: tuple[float, float]
    reached: bool
    confidence: float = CONFIDENCE

    @property
    def beta(self) -> tuple[int, int]:
        """Parameters of the Beta distribution of the false-alarm rate on new normal images."""
        a = max(self.flagged, 1)
        return a, self.n + 1 - a

    def false_alarms_range(self, m: int) -> tuple[int, int]:
        """Central ``confidence`` range of the number of false alarms among ``m`` new normal images
        (beta-binomial: the rate's uncertainty plus the draw of the ``m`` images)."""
        from scipy.stats import betabinom

        tail = (1.0 - self.confidence) / 2
        low, high = betabinom(m, *self.beta).ppf([tail, 1.0 - tail])
        return int(low), int(high)

    def to_json(self) -> dict[str, Any]:
        return {"target_fpr": self.target, "normal_images": self.n, "flagged": self.flagged,
                "observed_fpr": self.flagged / self.n, "expected_fpr": self.expected,
                "expected_fpr_interval": list(self.interval), "interval_confidence": self.confidence,
                "beta": list(self.beta), "target_reached": self.reached,
                "images_needed": images_needed(self.target)}


def false_alarm_threshold(normal_scores: np.ndarray, target: float,
                          confidence: float = CONFIDENCE) -> FalseAlarmThreshold:
    """The image threshold expecting at most ``target`` false alarms on new normal images (module docstring).

    Args:
        normal_scores: ``n`` scores of normal images (any shape, flattened).
        target: false-alarm rate in (0, 1).
    """
    from scipy.stats import beta

    scores = np.sort(np.asarray(normal_scores, np.float64).ravel())[::-1]
    n = scores.size
    if n == 0:
        raise ValueError("no normal images to calibrate on")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target false-alarm rate must be in (0, 1), got {target}")
    k = max(1, int(math.floor(target * (n + 1) + _EPS)))  # 0 when n is too small: the highest score then
    threshold = _flag_at_most(scores, k, complete=True)
    flagged = int(np.count_nonzero(scores >= threshold))
    a = max(flagged, 1)
    tail = (1.0 - confidence) / 2
    low, high = beta.ppf([tail, 1.0 - tail], a, n + 1 - a)
    expected = a / (n + 1)
    return FalseAlarmThreshold(threshold, target, n, flagged, expected, (float(low), float(high)),
                               expected <= target + _EPS, confidence)


class TopValues:
    """The largest values of a stream (for a pixel threshold at a small rate without keeping every map).

    ``capacity``: how many to keep (``floor(rate * total) + 1`` suffices for :meth:`threshold_at_rate`).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self.total = 0
        self._top = np.zeros(0, np.float32)

    def add(self, values: np.ndarray) -> None:
        flat = np.asarray(values, np.float32).ravel()
        if flat.size == 0:
            return
        self.total += flat.size
        merged = np.concatenate([self._top, flat])
        if merged.size > self.capacity:
            merged = np.partition(merged, merged.size - self.capacity)[-self.capacity:]
        self._top = merged

    def threshold_at_rate(self, rate: float) -> tuple[float, int]:
        """``(threshold, flagged)``: the lowest threshold flagging at most ``floor(rate * total)`` values."""
        k = int(math.floor(rate * self.total + _EPS))
        if k >= self.capacity:
            raise ValueError(f"TopValues keeps {self.capacity} values, a rate of {rate} needs {k + 1}")
        top = np.sort(self._top)[::-1]
        threshold = _flag_at_most(top, k, complete=top.size == self.total)
        return threshold, int(np.count_nonzero(top >= threshold))


# ------------------------------------------------------------------------------ collection


@dataclass
class CalibrationScores:
    """What a calibration run keeps: every image score and label; the maps and masks of the images
    with known ground truth (labelled mode) or the largest normal pixel values (``target_fpr``)."""

    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    normal_pixels: Optional[TopValues] = None

    @classmethod
    def for_run(cls, target_fpr: Optional[float], normal_images: int, image_size: int) -> "CalibrationScores":
        if target_fpr is None:
            return cls()
        return cls(normal_pixels=TopValues(math.floor(target_fpr * normal_images * image_size ** 2) + 1))

    def add(self, scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray,
            has_mask: np.ndarray) -> None:
        """One batch: ``scores``, ``labels`` (bool), ``has_mask`` (bool) ``B``; ``maps`` ``B x S x S`` float32
        (smoothed), ``masks`` ``B x S x S`` bool."""
        self.scores.append(np.asarray(scores, np.float64))
        self.labels.append(np.asarray(labels, bool))
        if self.normal_pixels is not None:
            self.normal_pixels.add(maps[~labels])
        else:
            known = has_mask | ~labels
            self.maps.append(maps[known])
            self.masks.append(masks[known])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores N, labels N)``."""
        if not self.scores:
            return np.zeros(0), np.zeros(0, bool)
        return np.concatenate(self.scores), np.concatenate(self.labels)


# ------------------------------------------------------------------------------- picking


HEADERS_LABELLED = ["threshold", "value", "criterion", "criterion value", "precision", "recall", "FPR",
                    "calibrated on"]
HEADERS_FALSE_ALARM = ["threshold", "value", "criterion", "flagged in calibration",
                       f"expected on new normal images ({CONFIDENCE:.0%} interval)", "calibrated on"]


@dataclass
class Picked:
    """Chosen thresholds, what to record in ``thresholds.json``, the report (table and summary lines)
    and the notes and warnings (for stderr)."""

    image: float
    pixel: Optional[float]
    criteria: dict[str, str]
    record: dict[str, Any]
    headers: list[str]
    rows: list[list[str]]
    notes: list[str]
    summary: list[str] = field(default_factory=list)


def _degenerate(what: str, flagged: int, total: int, of: str) -> Optional[str]:
    if total and flagged == total:
        return f"warning: the {what} threshold flags every one of the {total} {of}: it tells nothing apart"
    if total and flagged == 0:
        return f"warning: the {what} threshold flags none of the {total} {of}"
    return None


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def pick_labelled(data: CalibrationScores, criterion: str) -> Picked:
    """Max-F1 (or Youden) image threshold and max-F1 pixel threshold on labelled images."""
    scores, labels = data.arrays()
    pick = max_f1_threshold if criterion == "f1" else youden_threshold
    image_t, image_value = pick(labels, scores)
    stats = confusion(labels, scores, image_t)
    record: dict[str, Any] = {"images": int(labels.size), "anomalous": int(labels.sum()),
                              "normal": int((~labels).sum()), "image_f1": stats["f1"],
                              "image_precision": stats["precision"], "image_recall": stats["recall"],
                              "image_fpr": stats["fpr"]}
    rows = [["image", f"{image_t:.6g}", "max F1" if criterion == "f1" else "max Youden J", f"{image_value:.4f}",
             f"{stats['precision']:.4f}", f"{stats['recall']:.4f}", f"{stats['fpr']:.4f}",
             f"{labels.size} images ({int(labels.sum())} anomalous)"]]
    notes = [n for n in [_degenerate("image", int(np.count_nonzero(scores >= image_t)), labels.size,
                                     "calibration images")] if n]
    maps = np.concatenate(data.maps) if data.maps else np.zeros((0, 1, 1), np.float32)
    masks = np.concatenate(data.masks) if data.masks else np.zeros((0, 1, 1), bool)
    record["pixel_images"] = int(len(masks))
    pixel_t = None
    if masks.any():
        pixel_t, pixel_f1 = max_f1_threshold(masks, maps)
        pixel_stats = confusion(masks, maps, pixel_t)
        record.update(pixel_f1=pixel_f1, pixel_precision=pixel_stats["precision"],
                      pixel_recall=pixel_stats["recall"], pixel_fpr=pixel_stats["fpr"])
        rows.append(["pixel", f"{pixel_t:.6g}", "max F1", f"{pixel_f1:.4f}", f"{pixel_stats['precision']:.4f}",
                     f"{pixel_stats['recall']:.4f}", f"{pixel_stats['fpr']:.4f}",
                     f"{len(masks)} images, {masks.size} pixels"])
        notes += [n for n in [_degenerate("pixel", int(np.count_nonzero(maps >= pixel_t)), maps.size,
                                          "calibration pixels")] if n]
    else:
        notes.append("note: no defect image has a mask: no pixel threshold (calibrate with masks, or with "
                     "--target_fpr on the normal images)")
    return Picked(image_t, pixel_t, {"image_criterion": criterion, "pixel_criterion": "f1"}, record,
                  HEADERS_LABELLED, rows, notes)


def pick_false_alarm(data: CalibrationScores, target: float) -> Picked:
    """Thresholds flagging ``target`` of the normal images and of their pixels (module docstring);
    defect images, when there are any, are only counted (how many the image threshold catches)."""
    scores, labels = data.arrays()
    fa = false_alarm_threshold(scores[~labels], target)
    low, high = fa.interval
    record: dict[str, Any] = {"images": int(labels.size), "anomalous": int(labels.sum()),
                              "normal": int((~labels).sum()), "image": fa.to_json()}
    per_1000 = fa.false_alarms_range(1000)
    rows = [["image", f"{fa.threshold:.6g}", f"false alarms {_pct(target)}", _pct(fa.flagged / fa.n),
             f"{_pct(fa.expected)} ({_pct(low)}-{_pct(high)})", f"{fa.n} normal images"]]
    notes = []
    if not fa.reached:
        notes.append(f"warning: {fa.n} normal images cannot set a threshold at a {_pct(target)} false-alarm rate: "
                     f"the highest score expects {_pct(fa.expected)} on new normal images; the target needs at "
                     f"least {images_needed(target)} normal images")
    notes += [n for n in [_degenerate("image", fa.flagged, fa.n, "normal images")] if n]
    summary = [f"expected false-alarm rate on new normal images: {_pct(fa.expected)} ({CONFIDENCE:.0%} interval "
               f"{_pct(low)} to {_pct(high)} for {fa.n} calibration images), about {per_1000[0]} to {per_1000[1]} "
               f"false alarms per 1000 new normal images"]
    if labels.any():
        caught = int(np.count_nonzero(scores[labels] >= fa.threshold))
        record["image"]["defects_flagged"] = caught
        record["image"]["recall"] = caught / int(labels.sum())
        summary.append(f"the image threshold flags {caught} of the {int(labels.sum())} defect images")
        if caught == 0:
            notes.append(f"warning: the image threshold flags none of the {int(labels.sum())} defect images")
    pixels = data.normal_pixels
    pixel_t, flagged = pixels.threshold_at_rate(target)
    record["pixel"] = {"target_fpr": target, "pixels": pixels.total, "flagged": flagged,
                       "observed_fpr": flagged / pixels.total}
    rows.append(["pixel", f"{pixel_t:.6g}", f"false alarms {_pct(target)}", _pct(flagged / pixels.total), "",
                 f"{pixels.total} pixels of {fa.n} normal images"])
    notes += [n for n in [_degenerate("pixel", flagged, pixels.total, "normal pixels")] if n]
    criteria = {"image_criterion": "target_fpr", "pixel_criterion": "target_fpr"}
    return Picked(fa.threshold, pixel_t, criteria, record, HEADERS_FALSE_ALARM, rows, notes, summary)


# ------------------------------------------------------------------------------- running


def run_dataset(detector, dataset, batch_size: int, workers: int, into: CalibrationScores) -> None:
    """Score a :class:`~crane.data.CraneDataset` (images read as published), adding to ``into``."""
    from torch.utils.data import DataLoader

    from crane.logs import progress
    from crane.models.head import smooth_maps

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    for batch in progress(loader, desc="calibrate", unit="batch"):
        scores, raw = detector.predict_tensor(batch["img"])
        into.add(scores.numpy(), batch["anomaly"].numpy().astype(bool),
                      smooth_maps(raw.numpy(), detector.config.sigma), batch["img_mask"].numpy() > 0.5,
                      batch["has_mask"].numpy().astype(bool))


def run_samples(detector, samples: list, batch_size: int, into: CalibrationScores, bit_depth: int = 16,
                notes=None, left_out: Optional[set] = None) -> list[tuple[Any, str]]:
    """Score plain-folder samples (:class:`~crane.data.folders.FolderSample`; images turned as their EXIF
    orientation says, read at ``bit_depth``, as ``predict`` reads them), adding to ``into``; return the
    unreadable ``(path, reason)``. ``notes`` (:class:`~crane.data.image.InputNotes`) counts unusual inputs.

    With a reference memory (``detector.reference``) an image that is one of its references (the same
    preprocessed pixels) is scored by leave-one-out, against the memory without its own patches, as a new
    normal image would be (``docs/method.md``, "Few-shot", 4); the others against the whole memory. The
    indices of the references so scored are added to ``left_out`` (a set) when given."""
    import sys

    import torch

    from crane.data.image import load_mask, load_rgb, preprocess
    from crane.logs import progress
    from crane.models.head import smooth_maps

    size = detector.config.image_size
    skipped: list[tuple[Any, str]] = []
    with progress(total=len(samples), desc="calibrate", unit="img") as bar:
        for start in range(0, len(samples), batch_size):
            batch = []
            for sample in samples[start:start + batch_size]:
                try:
                    rgb = load_rgb(sample.path, exif_orientation=True, bit_depth=bit_depth, notes=notes)
                    if notes is not None:
                        notes.check_size(*rgb.shape[:2], size, str(sample.path))
                    x = preprocess(rgb, size)
                    mask = load_mask(sample.mask, size) if sample.mask is not None else torch.zeros(size, size)
                    batch.append((sample, x, mask))
                except Exception as e:  # any decoder failure skips this file only, as in predict
                    skipped.append((sample.path, str(e).strip() or type(e).__name__))
                    bar.write(f"skipped: {skipped[-1][1]}", file=sys.stderr)
                    bar.update(1)
            if not batch:
                continue
            images = torch.stack([x for _, x, _ in batch])
            exclude = None
            if detector.reference is not None and detector.reference.references > 1:
                exclude = detector.reference.exclusions(images)
                if left_out is not None:
                    left_out.update(int(i) for i in exclude if i >= 0)
            scores, raw = detector.predict_tensor(images, exclude=exclude)
            into.add(scores.numpy(), np.array([s.anomaly == 1 for s, _, _ in batch]),
                          smooth_maps(raw.numpy(), detector.config.sigma),
                          torch.stack([m for _, _, m in batch]).numpy() > 0.5,
                          np.array([s.mask is not None for s, _, _ in batch]))
            bar.update(len(batch))
    return skipped


# --------------------------------------------------------------------- with a reference memory


def memory_references(paths: Sequence[Any], what: str, where: str) -> list[Path]:
    """The reference images of a calibration that keeps its normal images as a memory
    (``calibrate --normal DIR --reference_memory``, the app's few-shot option): the distinct files of ``paths``
    (resolved, in order). :class:`CraneError` in one line, before any model work, when there are fewer than
    two (leave-one-out needs another); ``what`` names the option, ``where`` the images."""
    references = list(dict.fromkeys(Path(p).resolve() for p in paths))
    if len(references) < 2:
        raise CraneError(f"{what} needs at least 2 normal images (leave-one-out scores each against the others), "
                         f"found {len(references)} in {where}")
    return references


def build_memory(detector, references: Sequence[Path], coreset_ratio: float, few_shot_weight: float,
                 bit_depth: int = 16, what: str = "--reference_memory"):
    """Give ``detector`` the memory of the readable ``references`` (read as the calibration images are: EXIF
    orientation, ``bit_depth``; an unreadable one is skipped here and listed when it is scored) and return it
    (:class:`crane.models.memory.ReferenceMemory`). :class:`CraneError` (naming ``what``) when fewer than 2
    distinct images are left."""
    import sys

    from crane.data.image import load_rgb

    readable = []
    for path in references:
        try:
            load_rgb(path, exif_orientation=True, bit_depth=bit_depth)
            readable.append(path)
        except Exception:  # any decoder failure: the calibration lists the file as skipped when it scores it
            continue
    memory = None
    if len(readable) >= 2:
        print(f"building the reference memory of {len(readable)} normal images (coreset {coreset_ratio:g}, "
              f"few-shot weight {few_shot_weight:g}) ...", file=sys.stderr)
        memory = detector.set_reference(readable, coreset_ratio, few_shot_weight, progress=True,
                                        exif_orientation=True, bit_depth=bit_depth)
    if memory is None or memory.references < 2:
        found = len(readable) if memory is None else memory.references
        raise CraneError(f"{what} needs at least 2 distinct readable normal images, found {found} "
                         f"(of {len(references)} files)")
    return memory


def run_leave_one_out(detector, samples: list, batch_size: int, into: CalibrationScores, bit_depth: int = 16,
                      notes=None) -> tuple[list[tuple[Any, str]], int]:
    """:func:`run_samples` with the memory :func:`build_memory` gave ``detector``: each of its reference images
    among ``samples`` scored without its own patches. Returns the unreadable ``(path, reason)`` and how many
    images were scored by leave-one-out (every reference: checked)."""
    left_out: set[int] = set()
    skipped = run_samples(detector, samples, batch_size, into, bit_depth, notes, left_out)
    if len(left_out) != detector.reference.references:
        raise RuntimeError(f"only {len(left_out)} of the {detector.reference.references} reference images were "
                           "recognised when scored, so the others were not left out of the memory")
    return skipped, len(left_out)
