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
F1 or the false-alarm statistics of :mod:`crane.inspection.calibration`) and the model it was
calibrated for (``model``: the checkpoint's path and SHA-256, the settings and the
weights), which ``predict`` compares with its own run
(:func:`threshold_differences`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from crane import settings
from crane.checkpoints import CheckpointInfo, official_at, replace_problem
from crane.errors import CraneError
from crane.files import output_problem, write_json

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


class ThresholdsError(CraneError):
    """A thresholds file is unusable (one-line message)."""


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
    return write_json(path, thresholds.to_json())


def check_replaceable(path: Union[str, os.PathLike], overwrite: bool, flag: str, kind: tuple[str, str],
                      is_kind, elsewhere: str, overwrite_flag: Optional[str] = "--overwrite",
                      error: Optional[type] = None) -> Optional[str]:
    """Whether a calibration may write ``path`` (its thresholds file, or the reference memory beside it): the file
    must be writable; a shipped official checkpoint is never replaced; an existing file is replaced only when it
    is of ``kind`` (``is_kind(path)``; the returned note says so) or with ``overwrite``. ``kind``: ``(a ..., the
    ...)`` phrases. Raises ``error`` (default :class:`ThresholdsError`) in one line naming ``flag`` (what names
    the file) and ending with ``elsewhere`` (how to choose another file), and ``overwrite_flag`` (``None``: the
    caller offers none) for a file of another kind."""
    error = error or ThresholdsError
    path = Path(path).expanduser()
    problem = output_problem(path, flag=flag)
    if problem:
        raise error(f"cannot write {path} ({problem}); {elsewhere}")
    if official_at(path) is not None:
        raise error(replace_problem(path, True, flag))
    if path.is_file() and not overwrite:
        if not is_kind(path):
            replace = f", or pass {overwrite_flag} to replace it" if overwrite_flag else ""
            raise error(f"{flag} {path} exists and is not {kind[0]}; {elsewhere}{replace}")
        return f"note: replacing {kind[1]} in {path} (written by an earlier calibration)"
    return None


def _is_thresholds_file(path: Path) -> bool:
    try:
        load_thresholds(path)
    except (OSError, ValueError):
        return False
    return True


def check_output(output: Union[str, os.PathLike], overwrite: bool, flag: str, elsewhere: str,
                 overwrite_flag: Optional[str] = "--overwrite") -> Optional[str]:
    """Whether a calibration may write its thresholds to ``output`` (``calibrate`` and the app's rule,
    :func:`check_replaceable`): an existing thresholds file is replaced (the returned note says so), another file
    only with ``overwrite``. Raises :class:`ThresholdsError` in one line."""
    return check_replaceable(output, overwrite, flag, ("a thresholds file", "the thresholds"), _is_thresholds_file,
                             elsewhere, overwrite_flag)


def _optional_float(data: dict[str, Any], key: str, path: Path) -> Optional[float]:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ThresholdsError(f"{path}: '{key}' must be a number or null, got {value!r}")
    return float(value)


def load_thresholds(path: Union[str, os.PathLike]) -> Thresholds:
    """Read a ``thresholds.json``; raise ``ValueError`` with a one-line reason when it is unusable."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"thresholds file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ThresholdsError(f"cannot read thresholds file {path}: {e}; recreate it with `python -m crane calibrate`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ThresholdsError(f"{path} is not a Crane thresholds file (expected \"format\": \"{FORMAT}\"); "
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


# ------------------------------------------------------------------ the model a file was calibrated for


def weights_tag(weights: Optional[str], default: str) -> str:
    """How ``thresholds.json`` identifies weights: ``openai`` / ``synthetic`` / the default cache, or a file
    by its size (a copy or a move keeps it; other weights of the same architecture are rare)."""
    if weights in (None, "openai"):
        return default
    if weights == "synthetic":
        return "synthetic"
    path = Path(weights).expanduser()
    return f"file of {path.stat().st_size} bytes" if path.is_file() else f"missing file {weights}"


def model_record(options: Any, info: CheckpointInfo) -> dict[str, Any]:
    """The ``"model"`` entry of ``thresholds.json``: the checkpoint (``options.checkpoint``, its SHA-256), the
    settings the thresholds record (:data:`crane.settings.THRESHOLD_KEYS`, read from ``options``) and the
    weights, as :func:`threshold_differences` compares them."""
    record = {"checkpoint": str(options.checkpoint), "checkpoint_sha256": info.sha256,
              "checkpoint_source": info.source, **settings.recorded(options, "thresholds"),
              "weights": {"clip": weights_tag(options.clip_weights, "openai"),
                          "dino": None if options.dino_model == "none" else weights_tag(options.dino_weights,
                                                                                        "published")},
              "precision": options.precision}
    if options.dattn_batch_mean and options.dino_model != "none":
        record["batch_size"] = int(options.batch_size)  # the batch-wide D-Attn mean makes maps depend on it
    return record


def threshold_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """How the run's :func:`model_record` ``current`` differs from the ``recorded`` one, one phrase per setting
    that changes the scores (the checkpoint by SHA-256; the weights by :func:`weights_tag`)."""
    if not isinstance(recorded, Mapping) or "checkpoint_sha256" not in recorded:
        return ["it records no model settings or checkpoint SHA-256 (made by an older crane, or by hand)"]
    out = []
    if recorded["checkpoint_sha256"] != current["checkpoint_sha256"]:
        out.append(f"checkpoint SHA-256 {str(recorded['checkpoint_sha256'])[:12]} ({recorded.get('checkpoint')}), "
                   f"this run {current['checkpoint_sha256'][:12]} ({current['checkpoint']})")
    for key in settings.names("thresholds"):
        if settings.BY_NAME[key].role == "weights":
            continue
        value = recorded.get(key, settings.BEFORE_RECORDED.get(key))
        if key not in recorded and key not in settings.BEFORE_RECORDED:
            out.append(f"it records no --{key}")
        elif not settings.same(value, current[key]):
            out.append(f"{settings.flag_value(key, value)}, this run {settings.flag_value(key, current[key])}")
    if "batch_size" in recorded and "batch_size" in current and recorded["batch_size"] != current["batch_size"]:
        out.append(f"--batch_size {recorded['batch_size']} with the batch-wide D-Attn mean, this run "
                   f"--batch_size {current['batch_size']}")
    weights = recorded.get("weights") if isinstance(recorded.get("weights"), Mapping) else {}
    for kind, flag in (("clip", "clip_weights"), ("dino", "dino_weights")):
        if weights.get(kind) != current["weights"][kind] and current["weights"][kind] is not None:
            out.append(f"--{flag} {recorded.get(flag)} ({weights.get(kind)}), this run "
                       f"{current.get(flag)} ({current['weights'][kind]})")
    return out
