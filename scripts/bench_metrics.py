"""Benchmark crane.metrics against the published evaluation loop and scikit-learn.

Synthetic class: ``--n`` anomaly maps of ``--size`` x ``--size`` (float32, smooth
background plus noise, raised around rectangular and elliptic defects in about half
of the images; seeded). It reports, for each metric, our time and value next to the
reference's, the absolute difference and the peak traced memory (tracemalloc).

* AUPRO ``crane``: the published ``cal_pro_score_gpu`` (what its ``test.py`` calls), here
  on the CPU with torch: regions labelled once with ``skimage.measure``, then for each
  of the 200 thresholds a binarisation ``amaps > th`` and one indexed sum per region, on
  the first ``--naive_maps`` maps (it takes minutes on 200 maps of 518); ours on the same.
* pixel AUROC / AP / F1-max: sklearn on all pixels.

    .venv/bin/python scripts/bench_metrics.py --n 200 --size 518 --naive_maps 20
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import torch
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score
from tabulate import tabulate

from crane.metrics import aupro, pixel_ap, pixel_auroc, pixel_f1_max


def synthetic_class(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(masks uint8 N x S x S, maps float32 N x S x S)`` with rectangle and blob defects."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    maps = np.empty((n, size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        if i % 2 == 1:
            for _ in range(rng.integers(1, 4)):
                h, w = rng.integers(size // 40 + 1, size // 4, size=2)
                y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
                if rng.random() < 0.5:
                    masks[i, y0:y0 + h, x0:x0 + w] = 1
                else:
                    cy, cx = y0 + h / 2, x0 + w / 2
                    masks[i][((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1] = 1
        raised = ndimage.binary_dilation(masks[i], iterations=3) * rng.uniform(0.1, 0.5)
        noise = rng.normal(0.0, 1.0, (size, size))
        maps[i] = ndimage.gaussian_filter(0.3 + raised + noise, sigma=4)
    return masks, maps


def published_aupro(masks: np.ndarray, amaps: np.ndarray, max_step: int = 200,
                    expect_fpr: float = 0.3) -> float:
    """The published ``cal_pro_score_gpu`` arithmetic on the CPU (torch tensors).

    Grid ``np.arange`` over the Python-float extremes; ``amaps > th`` compares in the
    maps' dtype; PRO per region from its pixel coordinates; FPR over the negative pixels.
    """
    maps_t, masks_t = torch.from_numpy(amaps), torch.from_numpy(masks)
    regions = [(i, torch.from_numpy(r.coords[:, 0]), torch.from_numpy(r.coords[:, 1]), r.area)
               for i, mask in enumerate(masks) for r in measure.regionprops(measure.label(mask))]
    negatives = masks_t == 0
    n_negative = negatives.sum().item()
    low, high = maps_t.min().item(), maps_t.max().item()
    pros, fprs = [], []
    for th in np.arange(low, high, (high - low) / max_step):
        binary = maps_t > th
        pros.append(np.mean([binary[i, rows, cols].sum().item() / area for i, rows, cols, area in regions]))
        fprs.append(torch.logical_and(negatives, binary).sum().item() / n_negative)
    pros, fprs = np.array(pros), np.array(fprs)
    kept = fprs < expect_fpr
    fprs = fprs[kept]
    return auc((fprs - fprs.min()) / (fprs.max() - fprs.min()), pros[kept])


def sklearn_f1_max(truth: np.ndarray, scores: np.ndarray) -> float:
    """The published F1-max: ``precision_recall_curve`` then the finite max of 2pr/(p+r)."""
    precision, recall, _ = precision_recall_curve(truth, scores)
    with np.errstate(invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


def measure_call(fn, *args, trace_memory: bool = True) -> tuple[float, float, float | None]:
    """``(value, seconds, peak MiB)`` of one call; memory traced with tracemalloc if asked."""
    if trace_memory:
        tracemalloc.start()
    start = time.perf_counter()
    value = float(fn(*args))
    seconds = time.perf_counter() - start
    peak = None
    if trace_memory:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return value, seconds, peak


def row(name: str, ours, reference) -> list:
    """Table row from two ``measure_call`` results."""
    (v_ours, t_ours, m_ours), (v_ref, t_ref, m_ref) = ours, reference
    mem = lambda m: "-" if m is None else f"{m:.0f}"  # noqa: E731
    return [name, f"{t_ours:.2f}", f"{t_ref:.2f}", f"{t_ref / t_ours:.0f}x", f"{v_ours:.10f}",
            f"{abs(v_ours - v_ref):.1e}", mem(m_ours), mem(m_ref)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="number of maps (default 200)")
    parser.add_argument("--size", type=int, default=518, help="map side in pixels (default 518)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--naive_maps", "--naive-maps", type=int, default=None,
                        help="run the published AUPRO loop on the first K maps only (default: all)")
    args = parser.parse_args()
    k = args.n if args.naive_maps is None else min(args.naive_maps, args.n)

    masks, maps = synthetic_class(args.n, args.size, args.seed)
    truth, flat = masks.ravel(), maps.ravel()
    print(f"{args.n} maps of {args.size}x{args.size} ({maps.size / 1e6:.1f}M pixels, "
          f"{truth.mean():.1%} positive); published AUPRO loop on the first {k} maps")

    rows = [row(f"aupro crane ({k} maps)",
                measure_call(aupro, masks[:k], maps[:k]),
                measure_call(published_aupro, masks[:k], maps[:k], trace_memory=False))]
    for name, ours, reference in [("pixel auroc", pixel_auroc, roc_auc_score),
                                  ("pixel ap", pixel_ap, average_precision_score),
                                  ("pixel f1-max", pixel_f1_max, sklearn_f1_max)]:
        rows.append(row(f"{name} ({args.n} maps)", measure_call(ours, masks, maps),
                        measure_call(reference, truth, flat)))
    print(tabulate(rows, headers=["metric", "ours s", "reference s", "speed-up", "value (ours)",
                                  "|diff|", "ours peak MiB", "reference peak MiB"], disable_numparse=True))

    alone = []
    for method, num in [("crane", 200), ("mvtec", 200), ("mvtec", None)]:
        value, seconds, peak = measure_call(aupro, masks, maps, method, 0.3, num)
        alone.append([f"aupro {method} num_thresholds={num}", f"{value:.10f}", f"{seconds:.2f}",
                      f"{peak:.0f}"])
    print()
    print(tabulate(alone, headers=[f"ours on all {args.n} maps", "value", "seconds", "peak MiB"],
                   disable_numparse=True))


if __name__ == "__main__":
    main()
