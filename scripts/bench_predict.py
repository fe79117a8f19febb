"""Time ``crane.Detector.predict`` on one image against the published arithmetic and a plain CLIP forward.

All three run on CPU, in float32, on the same random ViT-L/14 widths (vision 1024 x 24
blocks x 16 heads, text 768 x 12; ``crane.models.synthetic.synthetic_clip_state_dict``)
and the same ``--image_size`` image:

* ``ours``: ``det.predict(image)`` of a Crane detector (features 6 12 18 24, soft_mean,
  dino none), or Crane+ with ``--dino`` (random DINOv2 ViT-B/14-reg4, features 24) —
  preprocessing, model, head and smoothing; model construction and text features excluded;
* ``published``: ``scripts/published_reference.py`` (materialised ``N x N`` attention, the
  original in-place updates, sequence-first), same scope (preprocess, model, head, smoothing);
* ``plain``: a plain open_clip ViT-L/14 ``VisionTransformer`` forward at the same size (positional
  embedding interpolated bilinearly) on an already preprocessed tensor; with ``--dino`` plus a plain
  DINOv2 forward.

After a warm-up call of each, the repeats run round-robin (ours, published, plain, ours, ...),
so load from other processes spreads over all three; the table shows the medians. It also
checks that ours and the published arithmetic agree (max abs difference of maps and scores).

    .venv/bin/python scripts/bench_predict.py --image_size 518 --repeats 3 --threads 2
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tabulate import tabulate

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import crane  # noqa: E402
from crane.models.synthetic import synthetic_clip_state_dict  # noqa: E402

HERE = Path(__file__).resolve().parent


def _published_reference():
    spec = importlib.util.spec_from_file_location("published_reference", HERE / "published_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_image(size: int, seed: int) -> np.ndarray:
    """A ``size x size x 3`` uint8 texture with a bright blob (deterministic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.5 + 0.25 * np.sin(2 * np.pi * (5 * xx + 3 * yy))[..., None] * rng.uniform(0.5, 1, 3)
    img += 0.05 * rng.standard_normal((size, size, 3))
    img[((yy - 0.6) ** 2 + (xx - 0.3) ** 2) < 0.01] = 0.95
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def random_dinov2_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random timm ``vit_base_patch14_reg4_dinov2`` weights (native 518)."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=518)
    return dict(model.state_dict())


def plain_clip_forward(clip_sd: dict[str, torch.Tensor], image_size: int, interpolate) -> Callable:
    """``images -> image embedding`` of an open_clip ``VisionTransformer`` built for ``image_size``."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    width = clip_sd["visual.conv1.weight"].shape[0]
    layers = len([k for k in clip_sd if k.startswith("visual.transformer.resblocks.") and k.endswith("in_proj_weight")])
    patch = clip_sd["visual.conv1.weight"].shape[-1]
    visual = _build_vision_tower(clip_sd["visual.proj"].shape[1], CLIPVisionCfg(
        layers=layers, width=width, patch_size=patch, image_size=image_size, head_width=64), quick_gelu=True)
    sd = {k[len("visual."):]: v for k, v in clip_sd.items() if k.startswith("visual.")}
    sd["positional_embedding"] = interpolate(sd["positional_embedding"], image_size // patch)
    visual.load_state_dict(sd, strict=True)
    visual.eval().requires_grad_(False)
    return visual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", "--image-size", type=int, default=518, help="model input size S (default 518)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method after one warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dino", action="store_true", help="Crane+ (random DINOv2, features 24) instead of Crane")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = _published_reference()
    size = args.image_size

    t0 = time.perf_counter()
    clip_sd = synthetic_clip_state_dict(vision_width=1024, seed=args.seed)
    dino_sd = random_dinov2_state_dict(args.seed + 1) if args.dino else None
    options = dict(features_list=(24,), soft_mean=False) if args.dino else dict(features_list=(6, 12, 18, 24),
                                                                                soft_mean=True)
    torch.manual_seed(args.seed)
    det = crane.Detector.from_config(clip_weights=clip_sd, dino_model="dinov2" if args.dino else "none",
                                     dino_weights=dino_sd, image_size=size, **options)
    published = ref.PublishedCrane(clip_sd, det.model.prompt_learner.state_dict(), image_size=size,
                                   dino_sd=dino_sd, **options)
    plain_visual = plain_clip_forward(clip_sd, size, ref.interpolate_positional_embedding)
    plain_dino = ref.Dinov2Features(dino_sd) if args.dino else None
    image = test_image(600, args.seed)
    x = ref.preprocess(image, size)[None]
    print(f"built models in {time.perf_counter() - t0:.1f} s; threads {torch.get_num_threads()}, "
          f"{'Crane+ (dinov2, features 24)' if args.dino else 'Crane (features 6 12 18 24, soft_mean)'}, "
          f"ViT-L/14 widths, image {size}x{size}", flush=True)

    def plain():
        with torch.no_grad():
            out = plain_visual(x)
            if plain_dino is not None:
                plain_dino(x)
        return out

    methods: dict[str, Callable] = {
        "ours (det.predict)": lambda: det.predict(image),
        "published arithmetic": lambda: published.predict(ref.preprocess(image, size)[None]),
        "plain open_clip forward" + (" + DINOv2" if args.dino else ""): plain,
    }
    results = {name: fn() for name, fn in methods.items()}  # warm-up, and the outputs to compare
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n.split()[0]} {t[-1]:.2f} s" for n, t in times.items()),
              flush=True)

    medians = {name: statistics.median(t) for name, t in times.items()}
    ours, pub, base = (medians[name] for name in methods)
    rows = [[name, f"{medians[name]:.2f}", " ".join(f"{t:.2f}" for t in times[name])] for name in methods]
    print(tabulate(rows, headers=["method", "median s", "all repeats s"], tablefmt="github"))
    ours_out, pub_out = results["ours (det.predict)"], results["published arithmetic"]
    map_diff = float(np.abs(ours_out.maps - pub_out["anomaly_map"]).max())
    score_diff = float(np.abs(ours_out.scores - pub_out["score"]).max())
    print(tabulate([
        ["ours / published", f"{ours / pub:.3f}", "< 1", "yes" if ours < pub else "NO"],
        ["ours / plain", f"{ours / base:.3f}", "<= 1.8", "yes" if ours <= 1.8 * base else "NO"],
        ["max |map ours - published|", f"{map_diff:.2e}", "<= 1e-4", "yes" if map_diff <= 1e-4 else "NO"],
        ["max |score ours - published|", f"{score_diff:.2e}", "<= 1e-4", "yes" if score_diff <= 1e-4 else "NO"],
    ], headers=["check", "value", "target", "met"], tablefmt="github"))


if __name__ == "__main__":
    main()
