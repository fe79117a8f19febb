"""Decision thresholds for anomaly scores and maps, and their ``thresholds.json`` file.

Rule used everywhere (``predict``, the panels, the masks): a value is anomalous when
it is **greater than or equal to** the threshold, ``value >= t``. This is the rule of
scikit-learn's ``precision_recall_curve`` / ``roc_curve``, so the F1 at the chosen
threshold is exactly the F1-max that ``crane.metrics`` reports.

Only thresholds equal to a positive sample's score need to be tried: moving a
threshold up to the next positive score removes false positives and keeps every
true positive, so neither F1 nor Youden's J can be larger in between. Ties between
thresholds with the same criterion value go to the lowest one (the one that
misses fewest defects).

``thresholds.json`` (written by ``python -m crane calibrate``) holds
``image_threshold`` (for image scores), ``pixel_threshold`` (for anomaly-map
values; ``null`` when it could not be set), the criteria (``f1``, ``youden`` or
``target_fpr``), what was learnt on the calibration images (``calibration``: counts,
F1 or the false-alarm statistics of :mod:`crane.calibration`) and the model it was
calibrated for (``model``: the checkpoint's path and SHA-256, the settings and the
weights), which ``predict`` compares with its own run
(:func:`crane.cli_setup.threshold_differences`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

FORMAT = "crane-thresholds/1"
FILENAME = "thresholds.json"
IMAGE_CRITERIA = ("f1", "youden")


@dataclass(frozen=True)
class Operating:
    """Counts at the candidate thresholds ``values`` (the distinct positive scores, ascending)."""

    values: np.ndarray
    tp: np.ndarray  # positives >= value
    fp: np.ndarray  # negatives >= value
    n_pos: int
    n_neg: int


def _operating(labels: np.ndarray, scores: np.ndarray) -> Operating:
    """True/false positive counts of ``scores >= v`` for every distinct positive score ``v``.

    Args:
        labels: any shape, binary (values > 0.5 are positive).
        scores: same shape, float.
    Raises:
        ValueError: on a shape mismatch, an empty input or when one class is missing.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in shape: {labels.shape} vs {scores.shape}")
    truth = labels if labels.dtype == bool else labels > 0.5
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    positive = scores[truth]
    negative = scores[~truth]
    if positive.size == 0 or negative.size == 0:
        raise ValueError(f"need both normal and anomalous samples to pick a threshold, got {positive.size} anomalous "
                         f"and {negative.size} normal")
    negative.sort()
    values, count = np.unique(positive, return_counts=True)
    tp = positive.size - np.cumsum(count) + count
    fp = negative.size - np.searchsorted(negative, values, side="left")
    return Operating(values, tp, fp, int(positive.size), int(negative.size))


def max_f1_threshold(labels, scores) -> tuple[float, float]:
    """Threshold maximising F1 of ``scores >= t`` against ``labels``.

    Args:
        labels: binary labels, any shape (``N`` images, or ``N x H x W`` masks).
        scores: float scores of the same shape (image scores or anomaly maps).
    Returns:
        ``(threshold, f1)``; the threshold is one of the scores.
    """
    op = _operating(labels, scores)
    f1 = 2.0 * op.tp / (op.n_pos + op.tp + op.fp)
    best = int(np.argmax(f1))
    return float(op.values[best]), float(f1[best])


def youden_threshold(labels, scores) -> tuple[float, float]:
    """Threshold maximising Youden's J = TPR - FPR of ``scores >= t``.

    Args:
        labels: binary labels, any shape.
        scores: float scores of the same shape.
    Returns:
        ``(threshold, J)``; the threshold is one of the scores.
    """
    op = _operating(labels, scores)
    j = op.tp / op.n_pos - op.fp / op.n_neg
    best = int(np.argmax(j))
    return float(op.values[best]), float(j[best])


def confusion(labels, scores, threshold: float) -> dict[str, float]:
    """Precision, recall, F1 and false-positive rate of ``scores >= threshold``."""
    truth = np.asarray(labels) > 0.5
    predicted = np.asarray(scores) >= threshold
    tp = int(np.sum(truth & predicted))
    fp = int(np.sum(~truth & predicted))
    n_pos, n_neg = int(truth.sum()), int(truth.size - truth.sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / n_pos if n_pos else float("nan")
    return {"precision": precision, "recall": recall, "f1": 2.0 * tp / (n_pos + tp + fp) if n_pos + tp + fp else float("nan"),
            "fpr": fp / n_neg if n_neg else float("nan")}


@dataclass
class Thresholds:
    """Image and pixel thresholds (``None``: not available) plus the file's metadata."""

    image: Optional[float] = None
    pixel: Optional[float] = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        """The ``thresholds.json`` content."""
        return {"format": FORMAT, "rule": "anomalous when value >= threshold", "image_threshold": self.image,
                "pixel_threshold": self.pixel, **self.meta}


def default_path(checkpoint: Union[str, os.PathLike]) -> Path:
    """``thresholds.json`` beside ``checkpoint``."""
    return Path(checkpoint).expanduser().parent / FILENAME


def save_thresholds(thresholds: Thresholds, path: Union[str, os.PathLike]) -> Path:
    """Write ``thresholds`` as JSON to ``path`` atomically (temp file + rename); return the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(thresholds.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _optional_float(data: dict[str, Any], key: str, path: Path) -> Optional[float]:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"{path}: '{key}' must be a number or null, got {value!r}")
    return float(value)


def load_thresholds(path: Union[str, os.PathLike]) -> Thresholds:
    """Read a ``thresholds.json``; raise ``ValueError`` with a one-line reason when it is unusable."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"thresholds file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read thresholds file {path}: {e}; recreate it with `python -m crane calibrate`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a Crane thresholds file (expected \"format\": \"{FORMAT}\"); "
                         "recreate it with `python -m crane calibrate`")
    meta = {k: v for k, v in data.items() if k not in ("format", "rule", "image_threshold", "pixel_threshold")}
    return Thresholds(_optional_float(data, "image_threshold", path), _optional_float(data, "pixel_threshold", path),
                      meta, str(path))


def parse_override(text: str) -> tuple[Optional[float], Optional[float]]:
    """Parse ``--threshold``: ``IMG``, ``IMG,PIX`` or ``,PIX`` -> ``(image, pixel)`` (``None`` where left out)."""
    parts = text.split(",")
    if len(parts) > 2 or not any(p.strip() for p in parts):
        raise ValueError(f"--threshold expects IMG, IMG,PIX or ,PIX (numbers), got {text!r}")
    values: list[Optional[float]] = []
    for part in parts:
        part = part.strip()
        if not part:
            values.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--threshold expects numbers (IMG, IMG,PIX or ,PIX), got {text!r}") from None
        if not np.isfinite(value):
            raise ValueError(f"--threshold values must be finite, got {text!r}")
        values.append(value)
    return values[0], values[1] if len(values) == 2 else None
