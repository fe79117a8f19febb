"""How far ``--precision bf16`` / ``fp16`` (and fp32 on another device) move the maps and scores.

One detector with random weights (a CLIP of ``--vision_width`` x ``--vision_layers``,
ViT-L/14 widths by default, with the shipped prompt-learner checkpoint; Crane+ adds a
random DINOv2) scores the same generated images (``datasets.synthetic`` textures with
defects) in every configuration; each is compared with fp32 on ``--reference_device``:
maps (smoothed, ``S x S``) and image scores, by max and mean absolute difference and
Pearson correlation (maps over all pixels), beside the spread (standard deviation) of the
reference values, which random weights keep small.

    python scripts/precision_drift.py --precisions bf16 --image_size 518 --images 4      # CPU: bf16 vs fp32
    python scripts/precision_drift.py --device cuda --precisions fp32 bf16 fp16 --fp32_tolerance 1e-4

With ``--fp32_tolerance T`` the exit status is 1 when fp32 on ``--device`` differs from fp32 on
the reference device by more than ``T`` (maps or scores). Random weights: the figures show the
arithmetic's drift, not its effect on the published metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from crane.device import precision_error  # noqa: E402
from crane.settings import PRECISIONS  # noqa: E402

CHECKPOINTS = {"crane": "trained_on_mvtec_crane", "cranep": "trained_on_mvtec_cranep"}


def images(n: int, size: int, image_size: int) -> torch.Tensor:
    """``n x 3 x S x S`` preprocessed generated images (half of them with a painted defect)."""
    from crane.data.image import preprocess
    from datasets.synthetic import make_synthetic_dataset

    with tempfile.TemporaryDirectory() as folder:
        root = make_synthetic_dataset(Path(folder) / "d", classes=1, train=0, test_normal=n - n // 2,
                                      test_anomalous=n // 2, size=size)
        files = sorted(p for p in (root / "test").rglob("*.png") if p.parent.name != "masks")
        return torch.stack([preprocess(f, image_size) for f in files])


def build(variant: str, width: int, layers: int, image_size: int):
    from crane.detector import build_model
    from crane.models.crane import CraneConfig
    from crane.models.synthetic import synthetic_clip_state_dict

    crane = variant == "crane"
    config = CraneConfig(features_list=(6, 12, 18, 24) if crane else (24,), soft_mean=crane,
                         dino_model="none" if crane else "dinov2", image_size=image_size)
    checkpoint = REPO / "checkpoints" / CHECKPOINTS[variant] / "epoch_5.pth"
    return build_model(synthetic_clip_state_dict(vision_width=width, vision_layers=layers), str(checkpoint),
                       None if crane else "synthetic", config)


def predict(model, device: str, precision: str, batch: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores ``N``, smoothed maps ``N x S x S`` (numpy float32) and the seconds per image (on a GPU after a
    warm-up batch)."""
    from crane.detector import Detector

    detector = Detector(model, device, precision, batch_size)
    if device != "cpu":
        detector.predict_tensor(batch[:1], smooth=True)
    start = time.perf_counter()
    parts = [detector.predict_tensor(batch[i:i + batch_size], smooth=True) for i in range(0, len(batch), batch_size)]
    seconds = (time.perf_counter() - start) / len(batch)
    return (torch.cat([s for s, _ in parts]).numpy(), torch.cat([m for _, m in parts]).numpy(), seconds)


def compare(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    (s0, m0), (s1, m1) = ref, got
    d_maps, d_scores = np.abs(m1 - m0), np.abs(s1 - s0)

    def corr(a: np.ndarray, b: np.ndarray) -> Optional[float]:
        a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None

    return {"map_max_abs": float(d_maps.max()), "map_mean_abs": float(d_maps.mean()), "map_corr": corr(m0, m1),
            "map_std": float(m0.std()), "score_max_abs": float(d_scores.max()), "score_mean_abs": float(d_scores.mean()),
            "score_corr": corr(s0, s1), "score_std": float(s0.std())}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("precision_drift.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reference_device", "--reference-device",
                   choices=("cpu", "cuda"), default="cpu", help="where fp32 is the reference")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["bf16"], help="run on --device")
    p.add_argument("--variants", nargs="+", choices=tuple(CHECKPOINTS), default=["crane", "cranep"])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--source_size", "--source-size", type=int, default=256, help="side of the generated images")
    p.add_argument("--image_size", "--image-size", type=int, default=518)
    p.add_argument("--batch_size", "--batch-size", type=int, default=2)
    p.add_argument("--vision_width", "--vision-width",
                   type=int, default=1024, help="CLIP vision width (ViT-L/14: 1024, 16 heads)")
    p.add_argument("--vision_layers", "--vision-layers", type=int, default=24)
    p.add_argument("--fp32_tolerance", "--fp32-tolerance", type=float, default=None,
                   help="exit 1 when fp32 on --device differs from the reference by more than this")
    p.add_argument("--output", type=Path, default=None, help="also write the figures to this JSON file")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    problems = [precision_error(p, args.device) for p in args.precisions]
    if "cuda" in (args.device, args.reference_device) and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA GPU here")
    if any(problems):
        print(f"precision_drift.py: error: {next(p for p in problems if p)}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    batch = images(args.images, args.source_size, args.image_size)
    rows: list[dict[str, Any]] = []
    for variant in args.variants:
        model = build(variant, args.vision_width, args.vision_layers, args.image_size)
        s, m, sec = predict(model, args.reference_device, "fp32", batch, args.batch_size)
        reference = (s, m)
        rows.append({"variant": variant, "device": args.reference_device, "precision": "fp32 (reference)",
                     "seconds_per_image": sec})
        for precision in args.precisions:
            if args.device == args.reference_device and precision == "fp32":
                continue
            s, m, sec = predict(model, args.device, precision, batch, args.batch_size)
            rows.append({"variant": variant, "device": args.device, "precision": precision, "seconds_per_image": sec,
                         **compare(reference, (s, m))})
        del model
    keys = ("map_max_abs", "map_mean_abs", "map_corr", "map_std", "score_max_abs", "score_mean_abs", "score_corr",
            "score_std")
    table = [[r["variant"], r["device"], r["precision"], f"{r['seconds_per_image']:.3f}",
              *("" if r.get(k) is None else f"{r[k]:.6f}" if k.endswith("corr") else f"{r[k]:.3g}" for k in keys)]
             for r in rows]
    print(f"{args.images} images at S = {args.image_size}, CLIP vision {args.vision_width} x {args.vision_layers} "
          f"(random weights), torch {torch.__version__}")
    print(tabulate(table, headers=["variant", "device", "precision", "s / image", *keys], tablefmt="github"))
    failed = []
    if args.fp32_tolerance is not None:
        failed = [r for r in rows if r["precision"] == "fp32" and
                  max(r["map_max_abs"], r["score_max_abs"]) > args.fp32_tolerance]
        for r in failed:
            print(f"FAIL {r['variant']}: fp32 on {r['device']} differs from {args.reference_device} by "
                  f"{max(r['map_max_abs'], r['score_max_abs']):.3g} > {args.fp32_tolerance:g}")
    if args.output:
        args.output.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v
                                                        for k, v in vars(args).items()}, "rows": rows},
                                          indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
