"""Milliseconds per image and parameters per CLIP x VFM pair, with synthetic weights of the real shapes.

    python scripts/bench_backbones.py --repeats 3 --out table.md

Every pair runs at its CLIP tower's usual size (518 for /14 towers, 512 for /16: 37 / 32 patches),
in one process against the published pair (ViT-L/14@336 + DINOv2-B). The speed check compares
Crane without a VFM: ViT-B/16 must be at least 3x faster per image than ViT-L/14@336 at the same
image size (512 px, so both see the same pixels). The numbers are the forward pass of
:class:`crane.models.crane.CraneModel` (E-Attn, D-Attn, head) on batches of ``--batch`` images,
the median of ``--repeats`` timed runs after one warm-up; weights are random (real shapes only),
so the accuracy column stays empty: fill it with the commands the table prints.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crane.models.build import build_model  # noqa: E402
from crane.models.crane import CraneConfig  # noqa: E402
from crane.models.synthetic import synthetic_clip_state_dict  # noqa: E402
from crane.models.towers import tower, usual_image_size  # noqa: E402

PAIRS = [("ViT-L-14-336", "dinov2"), ("ViT-L-14-336", "none"), ("ViT-B-16", "none"), ("ViT-B-16", "dinov3_vitb16"),
         ("ViT-B-16", "dinov3_vits16"), ("ViT-L-14", "dinov2_vitl14_reg"), ("ViT-L-14-336", "dinov3_vitl16"),
         ("ViT-B-32", "none")]


def _params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def measure(clip_model: str, dino_model: str, size: int, batch: int, repeats: int) -> tuple[float, float, float]:
    """(ms per image, CLIP parameters in millions, VFM parameters in millions) of one pair at ``size``."""
    config = CraneConfig(clip_model=clip_model, dino_model=dino_model, image_size=size,
                         features_list=(tower(clip_model).depth,))
    model = build_model(synthetic_clip_state_dict(vision_width=None, model=clip_model), None, "synthetic", config)
    images = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        text = model.text_features()
        model(images, text)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(images, text)
            times.append(time.perf_counter() - start)
    vfm = _params(model.vfm) if model.vfm is not None else 0.0
    return 1000 * statistics.median(times) / batch, _params(model.clip), vfm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown table here as well")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for clip_model, dino in PAIRS:
        size = usual_image_size(clip_model)
        ms, clip_m, vfm_m = measure(clip_model, dino, size, args.batch, args.repeats)
        rows.append((clip_model, dino, size, ms, clip_m, vfm_m))
        print(f"{clip_model:14s} + {dino:18s} @ {size}: {ms:8.1f} ms/image, CLIP {clip_m:.0f} M, VFM {vfm_m:.0f} M",
              flush=True)
    base = rows[0][3]
    same_l = measure("ViT-L-14-336", "none", 512, args.batch, args.repeats)[0]
    same_b = next(r[3] for r in rows if r[:2] == ("ViT-B-16", "none"))
    ratio = same_l / same_b
    lines = ["| CLIP | VFM | image | ms / image | vs ViT-L/14@336 + DINOv2-B | CLIP params (M) | VFM params (M) "
             "| accuracy (fill in) |", "|---|---|---|---|---|---|---|---|"]
    for clip_model, dino, size, ms, clip_m, vfm_m in rows:
        lines.append(f"| {clip_model} | {dino} | {size} | {ms:.1f} | {base / ms:.2f}x | {clip_m:.0f} | {vfm_m:.0f} | |")
    check = (f"Speed check (Crane, no VFM, both at 512 px): ViT-L-14-336 {same_l:.1f} ms/image, ViT-B-16 "
             f"{same_b:.1f} ms/image: {ratio:.2f}x faster ({'PASS' if ratio >= 3 else 'FAIL'}: at least 3x)")
    print("\n".join(lines) + "\n\n" + check)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n\n" + check + "\n")
    return 0 if ratio >= 3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
