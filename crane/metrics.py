"""Evaluation metrics of the Crane protocol (docs/method.md §7).

Image level: AUROC, average precision and F1-max of one anomaly score per image.
Pixel level: AUROC, average precision and F1-max over all pixels of a class, and
AUPRO (area under the per-region-overlap curve) in two definitions:

* ``method="crane"``: the 200-threshold definition of the published Crane
  evaluation, ``cal_pro_score_gpu`` (cflow-ad style): the float64 grid is rounded to
  the maps' dtype before comparing, as torch does (the unused numpy loop
  ``cal_pro_score`` compares unrounded and can differ by about 1e-3 when many scores
  sit on grid points).
* ``method="mvtec"``: the MVTec evaluation scripts. With ``num_thresholds`` set (the
  default, 200) it is ``au_pro_util.calculate_au_pro`` of the MVTec 3D-AD scripts, whose
  thresholds are that many order statistics of the negative-pixel scores; with
  ``num_thresholds=None`` it is ``pro_curve_util.compute_pro`` of the MVTec AD scripts,
  where every distinct score is a threshold. The conformance key
  ``pixel-aupro-mvtec-official`` is the former.

The AUROC / AP / F1-max values equal scikit-learn's (``roc_auc_score``,
``average_precision_score``, ``precision_recall_curve``) up to float rounding, and
the AUPRO values equal the published functions, but everything is computed from one
sort of the negative scores plus counts: no per-threshold pass over the pixels and
no float64 copy of the maps. A metric that is undefined for the data (one label class
only) is ``nan``.

Inputs may be numpy arrays or torch tensors, with the same results. Labels and masks
are binary (values above 0.5 count as positive); scores and maps keep their float dtype
(bfloat16, which numpy lacks, becomes float32; anything else non-float becomes float64).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc

__all__ = [
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------------------- inputs


def _to_numpy(x) -> np.ndarray:
    """Numpy view of an array or a (possibly GPU) torch tensor, in the same dtype (bfloat16: float32)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.dtype.itemsize < 4 and str(x.dtype) != "torch.float16":  # no numpy dtype
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _binary(x) -> np.ndarray:
    """Boolean array of a {0, 1} label/mask array (values above 0.5 are positive)."""
    x = _to_numpy(x)
    return x if x.dtype == bool else x > 0.5


def _scores(x) -> np.ndarray:
    """Score array in its own float dtype (non-float input becomes float64)."""
    x = _to_numpy(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def _pair(truth, scores, ndim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Binary truth and float scores of the same shape (and of ``ndim`` dims if given)."""
    truth, scores = _binary(truth), _scores(scores)
    if truth.shape != scores.shape:
        raise ValueError(f"shape mismatch: truth {truth.shape} vs scores {scores.shape}")
    if ndim is not None and truth.ndim != ndim:
        raise ValueError(f"expected {ndim}-D inputs (N x H x W), got shape {truth.shape}")
    if scores.size and not (np.isfinite(scores.min()) and np.isfinite(scores.max())):
        raise ValueError("scores/maps contain NaN or infinite values; metrics are undefined for them")
    return truth, scores


# ------------------------------------------------------------ ranking (AUROC, AP, F1)


def _sorted(scores: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The scores selected by boolean ``where``, as a 1-D copy sorted ascending in place.

    This is the one sort everything else is counted from; the copy keeps the scores'
    dtype (4 bytes per pixel for float32 maps).
    """
    selected = scores[where]
    selected.sort()
    return selected


class _OperatingPoints(NamedTuple):
    """Counts at the thresholds equal to the distinct positive scores ``v`` (ascending).

    Thresholds between positive scores only add false positives at unchanged recall,
    so they never change AP and never give the F1 maximum.
    """

    count: np.ndarray  # positives equal to v
    tp: np.ndarray  # positives >= v
    neg_below: np.ndarray  # negatives < v
    neg_at_most: np.ndarray  # negatives <= v
    n_pos: int
    n_neg: int


def _operating_points(truth: np.ndarray, scores: np.ndarray) -> _OperatingPoints | None:
    """Operating points of binary ``truth`` ranked by ``scores``; None if one class only."""
    positive = scores[truth]
    n_pos, n_neg = positive.size, scores.size - positive.size
    if n_pos == 0 or n_neg == 0:
        return None
    negative = _sorted(scores, ~truth)
    values, count = np.unique(positive, return_counts=True)
    return _OperatingPoints(
        count=count,
        tp=n_pos - np.cumsum(count) + count,
        neg_below=np.searchsorted(negative, values, side="left"),
        neg_at_most=np.searchsorted(negative, values, side="right"),
        n_pos=n_pos,
        n_neg=n_neg,
    )


def _auroc(truth: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half) = sklearn's trapezoid."""
    points = _operating_points(truth, scores)
    if points is None:
        return math.nan
    twice_wins = int(np.sum(points.count * (points.neg_below + points.neg_at_most)))
    return twice_wins / (2.0 * points.n_pos * points.n_neg)


def _average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """sklearn's AP: sum over thresholds of (recall increase) * precision."""
    points = _operating_points(truth, scores)
    if points is None:
        return math.nan
    precision = points.tp / (points.tp + points.n_neg - points.neg_below)
    return float(np.sum(points.count / points.n_pos * precision))


def _f1_max(truth: np.ndarray, scores: np.ndarray) -> float:
    """Max of ``2 p r / (p + r)`` over sklearn's precision-recall curve."""
    points = _operating_points(truth, scores)
    if points is None:
        return math.nan
    precision = points.tp / (points.tp + points.n_neg - points.neg_below)
    recall = points.tp / points.n_pos
    return float(np.max(2 * precision * recall / (precision + recall)))


# ------------------------------------------------------------------------ image level


def _image_pair(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels and float scores, both 1-D of length N."""
    labels, scores = _pair(labels, scores)
    if labels.ndim != 1:
        raise ValueError(f"expected 1-D labels and scores, got shape {labels.shape}")
    return labels, scores


def image_auroc(labels, scores) -> float:
    """Image-level ROC AUC, equal to sklearn ``roc_auc_score``.

    Args:
        labels: ``N`` in {0, 1} (1 = anomalous).
        scores: ``N`` float anomaly scores.
    Returns:
        The AUROC, ``nan`` when only one class is present.
    """
    return _auroc(*_image_pair(labels, scores))


def image_ap(labels, scores) -> float:
    """Image-level average precision, equal to sklearn ``average_precision_score``.

    Args:
        labels: ``N`` in {0, 1}.
        scores: ``N`` float.
    Returns:
        The AP, ``nan`` when only one class is present.
    """
    return _average_precision(*_image_pair(labels, scores))


def image_f1_max(labels, scores) -> float:
    """Image-level F1-max: max of ``2pr/(p+r)`` over sklearn's ``precision_recall_curve``.

    Args:
        labels: ``N`` in {0, 1}.
        scores: ``N`` float.
    Returns:
        The F1-max, ``nan`` when only one class is present.
    """
    return _f1_max(*_image_pair(labels, scores))


# ------------------------------------------------------------------------ pixel level


def pixel_auroc(masks, maps) -> float:
    """Pixel-level ROC AUC over all pixels, equal to sklearn ``roc_auc_score(masks.ravel(), maps.ravel())``.

    Args:
        masks: ``N x H x W`` (any shape) in {0, 1}.
        maps: float anomaly maps of the same shape.
    Returns:
        The AUROC, ``nan`` when all pixels are positive or all negative.
    """
    return _auroc(*_pair(masks, maps))


def pixel_ap(masks, maps) -> float:
    """Pixel-level average precision over all pixels, equal to sklearn ``average_precision_score``.

    Args:
        masks: ``N x H x W`` (any shape) in {0, 1}.
        maps: float anomaly maps of the same shape.
    Returns:
        The AP, ``nan`` when all pixels are positive or all negative.
    """
    return _average_precision(*_pair(masks, maps))


def pixel_f1_max(masks, maps) -> float:
    """Pixel-level F1-max over all pixels (published ``precision_recall_curve`` formula).

    Args:
        masks: ``N x H x W`` (any shape) in {0, 1}.
        maps: float anomaly maps of the same shape.
    Returns:
        The F1-max, ``nan`` when all pixels are positive or all negative.
    """
    return _f1_max(*_pair(masks, maps))


# ----------------------------------------------------------------------------- AUPRO


def _region_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores and weights of the pixels of all ground-truth regions.

    Each mask is labelled once (8-connected, per image). Returns the scores of the
    positive pixels, the weight ``1 / area`` of the region each belongs to, and the
    number of regions. The sum of the weights of a region's pixels above a threshold
    is that region's overlap, so the PRO is a weighted count divided by the number of
    regions.
    """
    values, weights, n_regions = [], [], 0
    for mask, amap in zip(masks, maps):
        inside, weight, n = _region_weights(mask)
        values.append(amap[inside])
        weights.append(weight)
        n_regions += n
    return np.concatenate(values), np.concatenate(weights), n_regions


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """For one ``H x W`` mask: its positive pixels, ``1 / area`` of each one's 8-connected
    region (in the order of ``mask[inside]``), and the number of regions."""
    regions, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    inside = regions > 0
    labels = regions[inside]
    return inside, 1.0 / np.bincount(labels)[labels], n


def _crane_histograms(masks: np.ndarray, maps: np.ndarray, thresholds: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Negative-pixel counts and region-weighted positive mass per threshold bin, in one pass.

    Bin ``j`` holds the pixels with exactly ``j`` thresholds below their score. Works
    image by image, so the only temporaries are one map's size.
    """
    bins = thresholds.size + 1
    negatives, mass = np.zeros(bins, np.int64), np.zeros(bins)
    n_regions = 0
    for mask, amap in zip(masks, maps):
        passed = _count_below(thresholds, amap)
        negatives += np.bincount(passed, minlength=bins)
        if mask.any():
            inside, weight, n = _region_weights(mask)
            in_region = passed[inside.ravel()]
            negatives -= np.bincount(in_region, minlength=bins)
            mass += np.bincount(in_region, weights=weight, minlength=bins)
            n_regions += n
    return negatives, mass, int(negatives.sum()), n_regions


def _count_below(thresholds: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Number of ``thresholds`` (ascending, evenly spaced up to rounding) strictly below each value.

    Equal to ``np.searchsorted(thresholds, values, side="left")``, but computed
    arithmetically (``floor((v - t0) / step) + 1``); only values within a small margin of
    a grid point are settled by exact comparisons, which is several times faster than a
    binary search per pixel. Returns a flat int64 array.
    """
    values = values.ravel()
    n = thresholds.size
    step = float(thresholds[-1] - thresholds[0]) / (n - 1) if n > 1 else 0.0
    magnitude = max(abs(float(thresholds[0])), abs(float(thresholds[-1]))) + step
    if step <= 0 or 8 * np.finfo(values.dtype).eps * magnitude / step > 1e-3:  # grid too fine for arithmetic
        return np.searchsorted(thresholds, values, side="left")
    position = (values - thresholds[0]) / values.dtype.type(step)
    count = np.floor(position).astype(np.int64) + 1
    np.clip(count, 0, n, out=count)
    near = np.abs(position - np.rint(position)) < 1e-2  # rounding may put these in the wrong bin
    if near.any():
        count[near] = _settle(thresholds, values[near], count[near])
    return count


def _settle(thresholds: np.ndarray, values: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Correct guessed counts that are off by a bin or two with exact comparisons."""
    padded = np.concatenate([[-np.inf], thresholds, [np.inf]]).astype(thresholds.dtype)
    for _ in range(4):
        up = padded[count + 1] < values  # thresholds[count] < value: count too small
        down = padded[count] >= values  # thresholds[count - 1] >= value: count too large
        if not (up.any() or down.any()):
            return count
        count = count + up - down
    return np.searchsorted(thresholds, values, side="left")  # a grid far from even


def _above(hist: np.ndarray) -> np.ndarray:
    """``out[j]`` = total of the bins above threshold ``j`` (bins ``j+1 ..``)."""
    return np.cumsum(hist[::-1])[::-1][1:]


def _pro_above(values: np.ndarray, weights: np.ndarray, n_regions: int,
               thresholds: np.ndarray) -> np.ndarray:
    """PRO at each of ascending ``thresholds``: mean over regions of the fraction ``> t``.

    One searchsorted of the region pixels against the grid, one weighted histogram
    and a reverse cumulative sum.
    """
    passed = np.searchsorted(thresholds, values, side="left")  # number of thresholds < value
    return _above(np.bincount(passed, weights=weights, minlength=thresholds.size + 1)) / n_regions


def _crane_thresholds(maps: np.ndarray, num_thresholds: int) -> np.ndarray:
    """The published grid ``np.arange(min, max, (max - min) / num_thresholds)``, in the maps' dtype.

    ``min`` and ``max`` are Python floats (``.item()`` of the tensor extremes), so the
    grid and its step are float64. The published ``cal_pro_score_gpu`` then compares
    ``amaps > th`` on a torch tensor, where a float scalar is cast to the tensor's dtype:
    for float32 maps each threshold is rounded to the nearest float32 before comparing
    (float64 maps compare unrounded). Returning the rounded grid makes ``v > t`` the
    published comparison.
    """
    low, high = float(maps.min()), float(maps.max())
    return np.arange(low, high, (high - low) / num_thresholds).astype(maps.dtype)


def _crane_aupro(masks, maps, max_fpr: float, num_thresholds: int) -> float:
    """Published Crane ``cal_pro_score_gpu`` (the function its ``test.py`` calls; cflow-ad style).

    Thresholds from :func:`_crane_thresholds`; FPR and PRO (``> t``) at each, counted
    from one histogram of the pixels over the grid; then keep ``fpr < max_fpr``,
    min-max rescale those FPRs and integrate with ``sklearn.metrics.auc``.
    """
    if maps.min() == maps.max():
        return math.nan
    thresholds = _crane_thresholds(maps, num_thresholds)
    negatives, mass, n_negative, n_regions = _crane_histograms(masks, maps, thresholds)
    fpr = _above(negatives) / n_negative
    pro = _above(mass) / n_regions
    kept = fpr < max_fpr
    fpr, pro = fpr[kept], pro[kept]
    if fpr.size == 0 or fpr.max() == fpr.min():
        return math.nan
    return float(auc((fpr - fpr.min()) / (fpr.max() - fpr.min()), pro))


def _mvtec_trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """``trapezoid(x, y, x_max)`` of the MVTec evaluation scripts (``x`` ascending).

    Trapezoidal area up to ``x_max``; when ``x_max`` is not a curve point, the last
    piece is closed with ``y`` interpolated linearly at ``x_max``.
    """
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max, side="right"))  # bisect.bisect
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    kept = x <= x_max
    x, y = x[kept], y[kept]
    return float(np.sum(0.5 * (x[1:] - x[:-1]) * (y[1:] + y[:-1])) + correction)


def _mvtec_grid_curve(masks, maps, num_thresholds: int) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve of MVTec 3D-AD ``au_pro_util.compute_pro``.

    Thresholds are the negative scores at ``np.linspace(0, n_neg - 1, num_thresholds,
    dtype=int)`` of their ascending order, FPR at position ``i`` is ``1 - (i + 1) / n_neg``,
    and the curve ends at (1, 1).
    """
    negative = _sorted(maps, ~masks)
    positions = np.linspace(0, negative.size - 1, num=num_thresholds, dtype=int)
    pro = _pro_above(*_region_pixels(masks, maps), negative[positions])
    fpr = 1.0 - (positions + 1) / negative.size
    return np.r_[fpr[::-1], 1.0], np.r_[pro[::-1], 1.0]


def _mvtec_exact_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve of MVTec AD ``pro_curve_util.compute_pro`` (every distinct score).

    The official curve visits every distinct score in descending order; it is
    horizontal across scores held by negative pixels only and vertical across scores
    held by positive pixels only, so the same polyline is traced by two points per
    distinct positive score ``v``: just above ``v`` (negatives ``> v``) and at ``v``
    (negatives ``>= v``). As in the official code, FPRs are float32 and both
    coordinates are clipped to 1, between the anchors (0, 0) and (1, 1).
    """
    negative = _sorted(maps, ~masks)
    values, weights, n_regions = _region_pixels(masks, maps)
    distinct, index = np.unique(values, return_inverse=True)
    mass_at_least = np.cumsum(np.bincount(index, weights=weights)[::-1])  # descending scores
    mass_above = np.r_[0.0, mass_at_least[:-1]]
    neg_above = negative.size - np.searchsorted(negative, distinct[::-1], side="right")
    neg_at_least = negative.size - np.searchsorted(negative, distinct[::-1], side="left")
    fp = np.r_[np.column_stack([neg_above, neg_at_least]).ravel(), negative.size]
    mass = np.r_[np.column_stack([mass_above, mass_at_least]).ravel(), mass_at_least[-1]]
    fpr = np.minimum(fp.astype(np.float32) / np.float32(negative.size), 1.0).astype(np.float64)
    pro = np.minimum(mass / n_regions, 1.0)
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]


def aupro(masks, maps, method: Literal["crane", "mvtec"] = "crane", max_fpr: float = 0.3,
          num_thresholds: int | None = 200) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``.

    Regions are the 8-connected components of each mask. PRO at a threshold ``t`` is
    the mean over all regions of all images of the fraction of region pixels with
    score ``> t``; FPR is the fraction of negative pixels above ``t``.

    Args:
        masks: ``N x H x W`` ground truth in {0, 1}.
        maps: ``N x H x W`` float anomaly maps.
        method: ``"crane"``, the published Crane evaluation (``num_thresholds`` evenly
            spaced thresholds from the minimum to the maximum of the maps; FPRs kept
            below ``max_fpr`` are min-max rescaled to [0, 1] and the area is not divided
            again), or ``"mvtec"``, the MVTec evaluation scripts (curve integrated to
            ``max_fpr`` with interpolation, divided by ``max_fpr``; ``num_thresholds``
            order statistics of the negative scores as thresholds (MVTec 3D-AD), or every
            distinct score when ``num_thresholds`` is None (MVTec AD)).
        max_fpr: FPR limit, in (0, 1].
        num_thresholds: number of thresholds (None only with ``method="mvtec"``).
    Returns:
        The AUPRO in [0, 1]; ``nan`` when there is no positive or no negative pixel,
        or, for ``"crane"``, when the maps are constant or fewer than two distinct FPRs
        fall below ``max_fpr`` (where the published code fails or gives nan).
    """
    masks, maps = _pair(masks, maps, ndim=3)
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    if method not in ("crane", "mvtec"):
        raise ValueError(f"method must be 'crane' or 'mvtec', got {method!r}")
    if num_thresholds is None and method == "crane":
        raise ValueError("method='crane' needs num_thresholds")
    if masks.all() or not masks.any():
        return math.nan
    if method == "crane":
        return _crane_aupro(masks, maps, max_fpr, num_thresholds)
    if num_thresholds is None:
        fpr, pro = _mvtec_exact_curve(masks, maps)
    else:
        fpr, pro = _mvtec_grid_curve(masks, maps, num_thresholds)
    return _mvtec_trapezoid(fpr, pro, max_fpr) / max_fpr
