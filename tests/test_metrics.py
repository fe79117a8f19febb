"""crane.metrics against the conformance values, scikit-learn and plain reference loops.

Conformance tolerance is the README's (1e-6 absolute); against sklearn and the
reference loops on random data the values must agree to 1e-9.
"""
from __future__ import annotations

import json
import math
from bisect import bisect

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from crane import metrics
from crane.metrics import (aupro, image_ap, image_auroc, image_f1_max, pixel_ap, pixel_auroc,
                           pixel_f1_max)
from tests.conftest import CONFORMANCE, conformance_available, params_or_skip

EIGHT = np.ones((3, 3), dtype=int)
KEYS = ["image-auroc", "image-ap", "image-f1", "pixel-auroc", "pixel-f1", "pixel-aupro",
        "pixel-aupro-mvtec-official"]


def _ours(key, maps, masks, labels, scores) -> float:
    return {
        "image-auroc": lambda: image_auroc(labels, scores),
        "image-ap": lambda: image_ap(labels, scores),
        "image-f1": lambda: image_f1_max(labels, scores),
        "pixel-auroc": lambda: pixel_auroc(masks, maps),
        "pixel-f1": lambda: pixel_f1_max(masks, maps),
        "pixel-aupro": lambda: aupro(masks, maps, method="crane"),
        "pixel-aupro-mvtec-official": lambda: aupro(masks, maps, method="mvtec"),
    }[key]()


# ------------------------------------------------------------------------ conformance


def _metric_cases() -> list:
    """All cases of metrics_expected.json as parameters (one skipped test, saying why, when it is absent)."""
    path = CONFORMANCE / "metrics_expected.json"
    names = sorted(json.loads(path.read_text())) if conformance_available() and path.is_file() else []
    return params_or_skip(names, names, "metrics_expected.json")


def _case_inputs(case: str, synth, conformance_dir):
    """``(expected values, (maps, masks, labels, scores))``, built by the case's own generator."""
    expected = json.loads((conformance_dir / "metrics_expected.json").read_text())[case]
    return expected, getattr(synth, expected["generator"])(**expected["inputs"])


@pytest.mark.parametrize("case", _metric_cases())
def test_conformance(case, synth, conformance_dir):
    expected, inputs = _case_inputs(case, synth, conformance_dir)
    for key in KEYS:
        assert _ours(key, *inputs) == pytest.approx(expected[key], abs=1e-6), key


@pytest.mark.parametrize("case", _metric_cases())
def test_conformance_numpy_and_torch_float32_and_float64(case, synth, conformance_dir):
    """The same data as a numpy array or a torch tensor gives the same value, float32 or float64."""
    _, (maps, masks, labels, scores) = _case_inputs(case, synth, conformance_dir)
    assert maps.dtype == np.float32
    for dtype in (np.float32, np.float64):
        as_numpy = maps.astype(dtype)
        as_torch = [torch.from_numpy(a) for a in (as_numpy, masks, labels, scores)]
        for key in KEYS:
            assert _ours(key, *as_torch) == _ours(key, as_numpy, masks, labels, scores), (dtype, key)


@pytest.mark.parametrize("case", _metric_cases())
def test_reference_loops_give_the_conformance_values(case, synth, conformance_dir):
    """The two published AUPRO functions as written (below) reproduce their conformance values;
    on ``on_grid`` they differ by more than the tolerance, so the conformance test tells them apart."""
    expected, (maps, masks, _, _) = _case_inputs(case, synth, conformance_dir)
    if maps.size > 20 * 64 * 64:
        pytest.skip("the per-threshold reference loops are slow on this case")
    assert _crane_gpu_reference(masks, maps) == pytest.approx(expected["pixel-aupro"], abs=1e-9)
    assert _crane_reference(masks, maps) == pytest.approx(expected["pixel-aupro-cpu-loop"], abs=1e-9)
    if case == "on_grid":
        assert abs(expected["pixel-aupro"] - expected["pixel-aupro-cpu-loop"]) > 1e-4
    # The same maps in float64: the published function compares them with the unrounded grid.
    wide = maps.astype(np.float64)
    assert aupro(masks, wide, method="crane") == pytest.approx(_crane_gpu_reference(masks, wide), abs=1e-9)


# ------------------------------------------------------------------- sklearn equality


def _sklearn_f1_max(truth, scores) -> float:
    precision, recall, _ = precision_recall_curve(truth, scores)
    with np.errstate(invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


def _random_pixels(seed: int, levels: int):
    """Blob masks and quantised maps (ties within and across classes), uint8 / float32."""
    rng = np.random.default_rng(seed)
    masks = (ndimage.gaussian_filter(rng.random((5, 48, 48)), (0, 3, 3)) > 0.54).astype(np.uint8)
    maps = np.round((rng.random((5, 48, 48)) + 0.3 * masks) * levels) / levels
    return masks, maps.astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_image_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.random(60) * 8 + labels * 3).astype(np.float32)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert image_f1_max(labels, scores) == pytest.approx(_sklearn_f1_max(labels, scores), abs=1e-9)


@pytest.mark.parametrize("seed,levels", [(0, 10), (1, 50), (2, 1000), (3, 3)])
def test_pixel_metrics_equal_sklearn(seed, levels):
    masks, maps = _random_pixels(seed, levels)
    truth, flat = masks.ravel(), maps.ravel()
    assert 0 < truth.sum() < truth.size
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(truth, flat), abs=1e-9)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(truth, flat), abs=1e-9)
    assert pixel_f1_max(masks, maps) == pytest.approx(_sklearn_f1_max(truth, flat), abs=1e-9)


# ------------------------------------------------------------------ AUPRO references


def _regions(masks):
    """(image index, boolean region mask) for every 8-connected region of every mask."""
    out = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=EIGHT)
        out += [(i, labelled == k) for k in range(1, n + 1)]
    return out


def _crane_reference(masks, maps, max_step=200, expect_fpr=0.3) -> float:
    """The published numpy ``cal_pro_score`` loop (unused by its test.py), one binarisation per threshold.

    ``maps > th`` with numpy float64 scalars compares float32 maps unrounded (numpy >= 2).
    """
    regions = _regions(masks)
    negatives = masks == 0
    low, high = maps.min(), maps.max()
    pros, fprs = [], []
    for th in np.arange(low, high, (high - low) / max_step):
        binary = maps > th
        pros.append(np.mean([binary[i][region].sum() / region.sum() for i, region in regions]))
        fprs.append(np.logical_and(negatives, binary).sum() / negatives.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    kept = fprs < expect_fpr
    fprs = fprs[kept]
    return auc((fprs - fprs.min()) / (fprs.max() - fprs.min()), pros[kept])


def _crane_gpu_reference(masks, maps, max_step=200, expect_fpr=0.3) -> float:
    """The published ``cal_pro_score_gpu`` (what its test.py calls), on the CPU.

    Grid over Python floats (``.item()`` of the extremes); ``amaps > th`` on a torch
    tensor casts each threshold to the tensor's dtype.
    """
    amaps = torch.as_tensor(maps)
    negatives = torch.as_tensor(masks) == 0
    regions = [(i, torch.from_numpy(region)) for i, region in _regions(np.asarray(masks))]
    low, high = amaps.min().item(), amaps.max().item()
    pros, fprs = [], []
    for th in np.arange(low, high, (high - low) / max_step):
        binary = amaps > th
        pros.append(np.mean([binary[i][region].sum().item() / region.sum().item() for i, region in regions]))
        fprs.append(torch.logical_and(negatives, binary).sum().item() / negatives.sum().item())
    pros, fprs = np.array(pros), np.array(fprs)
    kept = fprs < expect_fpr
    fprs = fprs[kept]
    return auc((fprs - fprs.min()) / (fprs.max() - fprs.min()), pros[kept])


def _trapezoid_reference(x, y, x_max) -> float:
    """``generic_util.trapezoid`` of the MVTec AD evaluation scripts."""
    x, y = np.array(x), np.array(y)
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        assert 0 < ins < len(x)
        y_interp = y[ins - 1] + ((y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1]))
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    mask = x <= x_max
    x, y = x[mask], y[mask]
    return np.sum(0.5 * (x[1:] - x[:-1]) * (y[1:] + y[:-1])) + correction


def _mvtec_grid_reference(masks, maps, num_thresholds=200, x_max=0.3) -> float:
    """MVTec 3D-AD ``au_pro_util.calculate_au_pro``: thresholds at negative-score quantiles."""
    regions = [maps[i][region] for i, region in _regions(masks)]
    negatives = np.sort(maps[masks == 0].astype(np.float64))
    fprs, pros = [1.0], [1.0]
    for pos in np.linspace(0, len(negatives) - 1, num=num_thresholds, dtype=int):
        threshold = negatives[pos]
        fprs.append(1.0 - (pos + 1) / len(negatives))
        pros.append(sum(1.0 - np.sum(r <= threshold) / len(r) for r in regions) / len(regions))
    return _trapezoid_reference(fprs[::-1], pros[::-1], x_max) / x_max


def _mvtec_exact_reference(masks, maps, x_max=0.3) -> float:
    """MVTec AD ``pro_curve_util.compute_pro`` (every distinct score a threshold) + trapezoid."""
    fp_change = (masks == 0).astype(np.uint32)
    pro_change = np.zeros(maps.shape)
    regions = _regions(masks)
    for i, region in regions:
        pro_change[i][region] = 1.0 / region.sum()
    order = np.argsort(maps.ravel())[::-1]
    scores = maps.ravel()[order]
    fprs = np.cumsum(fp_change.ravel()[order]).astype(np.float32) / np.float32(fp_change.sum())
    pros = np.cumsum(pro_change.ravel()[order]) / len(regions)
    keep = np.append(np.diff(scores) != 0, True)
    fprs, pros = np.clip(fprs[keep], None, 1.0), np.clip(pros[keep], None, 1.0)
    x = np.concatenate(([0.0], fprs, [1.0]))
    y = np.concatenate(([0.0], pros, [1.0]))
    return _trapezoid_reference(x, y, x_max) / x_max


def _aupro_inputs(seed: int, levels: int | None):
    """Small maps with several blob regions per mask; ``levels`` quantises (ties)."""
    rng = np.random.default_rng(seed)
    masks = (ndimage.gaussian_filter(rng.random((6, 40, 40)), (0, 2, 2)) > 0.56).astype(np.uint8)
    maps = ndimage.gaussian_filter(rng.random((6, 40, 40)), (0, 1, 1))
    maps += 0.15 * masks * rng.random((6, 40, 40))
    if levels is not None:
        maps = np.round(maps * levels) / levels
    assert len(_regions(masks)) >= 10
    return masks, maps.astype(np.float32)


def _on_grid(masks, maps, num: int, seed: int) -> np.ndarray:
    """``maps`` moved so that most scores sit on, or one float32 step beside, a float32-rounded
    published threshold: where the two comparisons (rounded or not) disagree."""
    rng = np.random.default_rng(seed)
    low, high = float(maps.min()), float(maps.max())
    grid = np.arange(low, high, (high - low) / num).astype(np.float32)
    idx = np.clip(np.searchsorted(grid, maps) + rng.integers(-1, 2, maps.shape), 0, grid.size - 1)
    moved = np.nextafter(grid[idx], np.where(rng.random(maps.shape) < 0.5, np.inf, -np.inf).astype(np.float32))
    moved = np.where(rng.random(maps.shape) < 0.4, grid[idx], moved).astype(np.float32)
    moved.flat[0], moved.flat[1] = np.float32(low), np.float32(high)
    return moved


@pytest.mark.parametrize("seed,levels,on_grid", [(0, None, False), (1, None, False), (2, 40, False),
                                                 (3, 400, False), (4, None, True), (5, 40, True)])
def test_crane_aupro_equals_published_gpu_function(seed, levels, on_grid):
    masks, maps = _aupro_inputs(seed, levels)
    for num, max_fpr in ((200, 0.3), (57, 0.1)):
        data = _on_grid(masks, maps, num, seed) if on_grid else maps
        for dtype in (np.float32, np.float64):
            expected = _crane_gpu_reference(masks, data.astype(dtype), max_step=num, expect_fpr=max_fpr)
            ours = aupro(masks, data.astype(dtype), method="crane", max_fpr=max_fpr, num_thresholds=num)
            assert ours == pytest.approx(expected, abs=1e-9), (num, dtype)
            assert aupro(torch.from_numpy(masks), torch.from_numpy(data.astype(dtype)), method="crane",
                         max_fpr=max_fpr, num_thresholds=num) == ours


@pytest.mark.parametrize("seed,levels", [(0, None), (2, 40), (3, 400)])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_mvtec_aupro_equals_official_code(seed, levels, max_fpr):
    masks, maps = _aupro_inputs(seed, levels)
    assert aupro(masks, maps, method="mvtec", max_fpr=max_fpr) == pytest.approx(
        _mvtec_grid_reference(masks, maps, x_max=max_fpr), abs=1e-9)
    assert aupro(masks, maps, method="mvtec", max_fpr=max_fpr, num_thresholds=None) == pytest.approx(
        _mvtec_exact_reference(masks, maps, x_max=max_fpr), abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_thresholds_compare_like_torch(dtype):
    """``tensor > th`` with a float64 threshold (what the published grid holds) is ``v > th``
    rounded to the tensor's dtype: that is the grid ``_crane_thresholds`` returns."""
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((3, 40, 40))).to(dtype)
    grid = metrics._crane_thresholds(metrics._to_numpy(maps), 200)
    assert grid.dtype == metrics._to_numpy(maps).dtype
    low, high = maps.min().item(), maps.max().item()
    published = np.arange(low, high, (high - low) / 200)
    assert published.size == grid.size
    near = torch.from_numpy(np.concatenate([grid, np.nextafter(grid, np.inf), np.nextafter(grid, -np.inf)]))
    values = torch.cat([maps.flatten(), near.to(dtype)])
    for th, ours in zip(published, grid):
        np.testing.assert_array_equal((values > th).numpy(), metrics._to_numpy(values) > ours)


# ----------------------------------------------------------------- edge cases, inputs


def test_single_class_is_nan():
    scores = np.linspace(0, 1, 8)
    for labels in (np.zeros(8), np.ones(8)):
        assert math.isnan(image_auroc(labels, scores))
        assert math.isnan(image_ap(labels, scores))
        assert math.isnan(image_f1_max(labels, scores))
    maps = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    for masks in (np.zeros((2, 16, 16), np.uint8), np.ones((2, 16, 16), np.uint8)):
        for metric in (pixel_auroc, pixel_ap, pixel_f1_max):
            assert math.isnan(metric(masks, maps))
        for method, num in (("crane", 200), ("mvtec", 200), ("mvtec", None)):
            assert math.isnan(aupro(masks, maps, method=method, num_thresholds=num))


def test_torch_inputs(synth):
    maps, masks, labels, scores = synth.metric_inputs(n=6, size=32, seed=3)
    as_torch = [torch.from_numpy(a) for a in (maps, masks, labels, scores)]
    for key in KEYS:
        ours = _ours(key, maps, masks, labels, scores)
        assert isinstance(ours, float)
        assert _ours(key, *as_torch) == ours, key
    assert pixel_auroc(torch.from_numpy(masks).bool(), torch.from_numpy(maps).bfloat16()) == pytest.approx(
        pixel_auroc(masks, torch.from_numpy(maps).bfloat16().float().numpy()), abs=0)


def test_rejects_bad_arguments():
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[:, 2:4, 2:4] = 1
    maps = np.random.default_rng(0).random((2, 8, 8))
    with pytest.raises(ValueError):
        pixel_auroc(masks, maps[:1])
    with pytest.raises(ValueError):
        aupro(masks[0], maps[0])
    with pytest.raises(ValueError):
        aupro(masks, maps, method="other")
    with pytest.raises(ValueError):
        aupro(masks, maps, max_fpr=0.0)
    with pytest.raises(ValueError):
        aupro(masks, maps, method="crane", num_thresholds=None)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_scores_are_rejected(bad):
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[1, 1:3, 1:3] = 1
    maps = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    maps[0, 0, 0] = bad
    for fn in (metrics.pixel_auroc, metrics.pixel_ap, metrics.pixel_f1_max, metrics.aupro):
        with pytest.raises(ValueError, match="NaN or infinite"):
            fn(masks, maps)
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.image_auroc(np.array([0, 1]), np.array([0.2, bad]))


@pytest.mark.parametrize("base,width", [(0.0, 1.0), (1000.0, 1e-2), (-50.0, 1e-4), (0.3, 5.0)])
def test_threshold_binning_equals_searchsorted(base, width):
    """The arithmetic binning behind the crane AUPRO is exact, ties and neighbours included."""
    from crane.metrics import _count_below

    rng = np.random.default_rng(abs(int(width * 1e4) + int(base)))
    for dtype in (np.float32, np.float64):
        low = dtype(base + rng.normal())
        high = dtype(low + width)
        thresholds = np.arange(low, high, (high - low) / 200).astype(dtype)
        values = rng.uniform(low - width / 3, high + width / 3, 6000).astype(dtype)
        n = thresholds.size
        values[:n] = thresholds
        values[n:2 * n] = np.nextafter(thresholds, dtype(np.inf))
        values[2 * n:3 * n] = np.nextafter(thresholds, dtype(-np.inf))
        np.testing.assert_array_equal(_count_below(thresholds, values.reshape(60, 100)),
                                      np.searchsorted(thresholds, values, side="left"))
