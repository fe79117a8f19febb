"""Images per second of the whole ``test.py`` pipeline, and where the time goes.

Generates a dataset (``datasets.synthetic``: N PNG images of ``--source_size`` pixels over
``--classes`` classes, half of them anomalous with masks), then runs the evaluation engine
of ``test.py`` on it (decode, model, smoothing, gathering, metrics, files; ``--profile``'s
:class:`crane.engine.timing.StageTimer`) with

* ``null``: a stand-in for the detector that copies each batch to the device and returns
  fixed scores and maps made once there (random, so the metrics do real work): the
  pipeline's ceiling, everything but the model;
* ``full``: the real model with random weights at the published widths: a CLIP ViT-L/14
  (vision 1024 wide, 24 blocks, 16 heads, patch 14; ``crane.models.synthetic``) with the
  shipped prompt-learner checkpoint, and for Crane+ a random DINOv2 (``--dino_weights
  synthetic``);

and, for comparison, ``decode``: the same loader (same batches, workers and pinned
memory) iterated alone, each batch copied to the device. Each run prints images/s,
every stage's seconds and share of the wall time (metrics run in a background thread,
so the shares need not add up to 100%), and on a GPU the peak memory.

The stand-in is injected in every process: the script runs the evaluation's ``worker``
itself (in ``--nproc`` spawned processes: gloo on CPU, NCCL on GPU) with the detector
builder replaced. Model construction (and, on a GPU or with ``--compile``, a warm-up batch,
which pays the compilation) is not counted.

    python scripts/bench_throughput.py --models null --images 64                  # the ceiling at 518
    python scripts/bench_throughput.py --models null full --images 4 --batch_size 2
    python scripts/bench_throughput.py --device cuda --variants crane cranep --images 512 \\
        --batch_size 32 --precision bf16 --output bench.json
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from crane.device import precision_error  # noqa: E402
from crane.settings import PRECISIONS  # noqa: E402
from crane.engine import evaluate  # noqa: E402
from crane.engine.distributed import barrier, launch  # noqa: E402
from crane.engine.timing import STAGES  # noqa: E402

VARIANTS = {"crane": "trained_on_mvtec_crane", "cranep": "trained_on_mvtec_cranep"}
"""Shipped checkpoints whose settings each variant runs with (Crane: features 6 12 18 24, soft mean;
Crane+: feature 24 with DINOv2)."""
MODELS = ("null", "full")
DISTINCT = 2
"""Distinct generated images per class and kind (normal, anomalous) in the benchmark dataset."""


# ------------------------------------------------------------------------------ detectors


class NullDetector:
    """Stands in for :class:`crane.Detector` in the evaluation: the batch is copied to the device
    (as the model's forward does) and the scores ``B`` and raw maps ``B x S x S`` returned are
    fixed random tensors made once on the device."""

    def __init__(self, config, device: torch.device, batch_size: int) -> None:
        self.config, self.device = config, device
        generator = torch.Generator().manual_seed(0)
        size = config.image_size
        self._scores = torch.rand(batch_size, generator=generator).to(device)
        self._maps = torch.rand(batch_size, size, size, generator=generator).to(device)

    def forward(self, images: torch.Tensor, image_token_type: Optional[str] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        images.to(self.device, non_blocking=True)
        return self._scores[:len(images)], self._maps[:len(images)]


def build_null(opts: evaluate.EvalOptions, checkpoint: dict) -> NullDetector:
    from crane.models.crane import CraneConfig

    return NullDetector(CraneConfig.from_options(opts), torch.device(opts.device), opts.batch_size)


def build_full(opts: evaluate.EvalOptions, checkpoint: dict, vision: tuple[int, int] = (1024, 24)):
    """The real detector with a random CLIP of ``vision`` = (width, blocks) (ViT-L/14 by default; and a random
    DINOv2 for Crane+), warmed up on one batch on a GPU or with ``--compile``."""
    from crane.detector import Detector
    from crane.models.build import build_model
    from crane.models.crane import CraneConfig
    from crane.models.synthetic import synthetic_clip_state_dict

    device = torch.device(opts.device)
    model = build_model(synthetic_clip_state_dict(vision_width=vision[0], vision_layers=vision[1]), checkpoint,
                        opts.dino_weights, CraneConfig.from_options(opts))
    detector = Detector(model, device, opts.precision, opts.batch_size, opts.compile)
    if device.type == "cpu" and not opts.compile:
        return detector  # nothing to warm up
    images = torch.zeros(opts.batch_size, 3, opts.image_size, opts.image_size)
    start = time.perf_counter()
    detector.forward(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"warm-up batch (rank {os.environ.get('RANK', '0')}): {time.perf_counter() - start:.1f} s", flush=True)
    return detector


# -------------------------------------------------------------------------------- workers


def _peak_memory(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def pipeline_worker(opts: evaluate.EvalOptions, plan: evaluate.EvalPlan, model: str, vision: tuple[int, int],
                    out: str) -> None:
    """One process of a benchmark run: the evaluation's worker with the benchmark's detector builder."""
    if opts.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    evaluate.worker(opts, plan, build_null if model == "null" else functools.partial(build_full, vision=vision))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", torch.cuda.current_device()) if opts.device == "cuda" else torch.device("cpu")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak_memory": _peak_memory(device)}))


def decode_worker(opts: evaluate.EvalOptions, plan: evaluate.EvalPlan, out: str) -> None:
    """One process of "decoding alone": this rank's batches through the evaluation's loader, copied to the device."""
    ctx = evaluate.join(opts)
    loader = evaluate.rank_loader(plan, ctx)
    barrier(ctx)
    start = time.perf_counter()
    images = 0
    for batch in loader:
        batch["img"].to(ctx.device, non_blocking=True)
        batch["img_mask"].to(ctx.device, non_blocking=True)
        images += len(batch["img"])
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    barrier(ctx)
    if ctx.is_main:
        Path(out, "decode.json").write_text(json.dumps({"wall_seconds": time.perf_counter() - start}))


# ---------------------------------------------------------------------------------- runs


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def make_dataset(root: Path, images: int, classes: int, size: int) -> tuple[Path, int]:
    """``root/bench`` with meta.json: ``images`` (rounded up to a multiple of ``classes``) PNG files of
    ``size`` px, half of each class normal, half anomalous with a mask. ``datasets.synthetic`` draws
    :data:`DISTINCT` images of each kind per class (about a second each at 1024 px); the others are hard
    links to them under their own names (decoding costs the same). Reused when made with the same arguments."""
    from datasets.synthetic import make_synthetic_dataset

    per_class = max(1, math.ceil(images / classes))
    counts = {"normal": per_class - per_class // 2, "anomalous": per_class // 2}
    key = {"classes": classes, **counts, "size": size}
    folder = root / "bench"
    stamp = folder / "bench_args.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        return folder, classes * per_class
    shutil.rmtree(folder, ignore_errors=True)
    print(f"generating {classes * per_class} images of {size} x {size} in {folder} ...", flush=True)
    make_synthetic_dataset(folder, classes=classes, train=0, test_normal=min(DISTINCT, counts["normal"]),
                           test_anomalous=min(DISTINCT, counts["anomalous"]), size=size, seed=0)
    meta = json.loads((folder / "meta.json").read_text())
    for cls_name, samples in meta["test"].items():
        drawn = {kind: [s for s in samples if s["anomaly"] == (kind == "anomalous")] for kind in counts}
        extended = []
        for kind, count in counts.items():
            for j in range(count):
                source = drawn[kind][j % len(drawn[kind])]
                if j < len(drawn[kind]):
                    extended.append(source)
                    continue
                sample = dict(source, img_path=str(Path(source["img_path"]).with_name(f"x{j:05d}.png")))
                _link(folder / source["img_path"], folder / sample["img_path"])
                if source["mask_path"]:
                    sample["mask_path"] = str(Path(source["mask_path"]).with_name(f"x{j:05d}_mask.png"))
                    _link(folder / source["mask_path"], folder / sample["mask_path"])
                extended.append(sample)
        meta["test"][cls_name] = extended
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    stamp.write_text(json.dumps(key))
    return folder, classes * per_class


def eval_options(args: argparse.Namespace, variant: str, data_root: Path, save: Path) -> evaluate.EvalOptions:
    """test.py's options for one run: results in ``save/results``, stage timings in ``save/profile.json``."""
    return evaluate.EvalOptions(
        dataset="bench", datasets_root_dir=str(data_root), checkpoint=str(REPO / "checkpoints" / VARIANTS[variant] /
                                                                          "epoch_5.pth"),
        save_path=str(save / "results"), clip_weights="synthetic", dino_weights="synthetic" if variant == "cranep" else None,
        device=args.device, devices=list(range(args.nproc)), batch_size=args.batch_size, num_workers=args.num_workers,
        precision=args.precision, compile=args.compile, image_size=args.image_size,
        dattn_batch_mean=args.dattn_batch_mean, save_maps=args.save_maps, profile=str(save / "profile.json"))


def variant_plan(args: argparse.Namespace, variant: str, data_root: Path, work: Path) -> evaluate.EvalPlan:
    """The evaluation plan of a variant (options checked, every image decoded once), made once for its runs."""
    save = work / f"{variant}_plan"
    shutil.rmtree(save, ignore_errors=True)
    return evaluate.prepare(eval_options(args, variant, data_root, save))


def run_one(args: argparse.Namespace, plan: evaluate.EvalPlan, variant: str, model: str, work: Path
            ) -> dict[str, Any]:
    """One benchmark run (``model``: ``decode``, ``null`` or ``full``) of ``plan`` in a fresh results folder;
    returns its figures."""
    save = work / f"{variant}_{model}"
    shutil.rmtree(save, ignore_errors=True)
    save.mkdir(parents=True)
    opts = dataclasses.replace(plan.opts, save_path=str(save / "results"), profile=str(save / "profile.json"))
    plan = dataclasses.replace(plan, opts=opts, save_path=save / "results")
    n = len({i for runs in plan.batches.values() for b in runs for i in b})
    print(f"--- {variant} / {model}: {n} images in {len(plan.pending)} classes, {args.nproc} process(es) on "
          f"{args.device}", flush=True)
    if model == "decode":
        launch(decode_worker, args.nproc, plan.opts, plan, str(save))
        wall = json.loads((save / "decode.json").read_text())["wall_seconds"]
        return {"variant": variant, "model": model, "images": n, "wall_seconds": wall, "images_per_second": n / wall}
    launch(pipeline_worker, args.nproc, plan.opts, plan, model, (args.vision_width, args.vision_layers), str(save))
    report = json.loads((save / "profile.json").read_text())
    peaks = [json.loads(p.read_text())["peak_memory"] for p in sorted(save.glob("rank*.json"))]
    return {"variant": variant, "model": model, **report,
            "peak_memory": max(peaks) if peaks and None not in peaks else None}


def _row(result: dict[str, Any], decode: Optional[dict[str, Any]]) -> list[Any]:
    def stage(s: str) -> str:
        if "seconds" not in result:
            return ""
        return f"{result['seconds'][s]:.2f} ({100 * result['share'][s]:.0f}%)"

    peak = result.get("peak_memory")
    versus = f"{result['images_per_second'] / decode['images_per_second']:.3g}" if decode else ""
    name = "decoding alone" if result["model"] == "decode" else f"{result['model']} model"
    return [f"{result['variant']}: {name}", result["images"], f"{result['wall_seconds']:.2f}",
            f"{result['images_per_second']:.3g}", versus, *(stage(s) for s in STAGES),
            f"{peak / 2 ** 30:.2f} GiB" if peak else ""]


def report(results: list[dict[str, Any]]) -> str:
    """The table of all runs (``vs decode``: images/s over decoding alone's, same variant)."""
    decodes = {r["variant"]: r for r in results if r["model"] == "decode"}
    rows = [_row(r, decodes.get(r["variant"]) if r["model"] != "decode" else None) for r in results]
    headers = ["run", "images", "wall s", "img/s", "vs decode", *(f"{s} s (share)" for s in STAGES), "peak GPU mem"]
    lines = [tabulate(rows, headers=headers, tablefmt="github")]
    for variant, dec in decodes.items():
        null = next((r for r in results if r["variant"] == variant and r["model"] == "null"), None)
        if null:
            added = null["wall_seconds"] - dec["wall_seconds"]
            lines.append(f"{variant}: the pipeline around a null model takes {null['wall_seconds']:.2f} s against "
                         f"{dec['wall_seconds']:.2f} s for decoding alone: {added:+.2f} s "
                         f"({100 * added / dec['wall_seconds']:+.0f}%, {1000 * added / null['images']:+.1f} ms per "
                         f"image)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_throughput.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                   help="null: the pipeline's ceiling; full: ViT-L/14 widths with random weights")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=["crane"],
                   help="crane (features 6 12 18 24) and/or cranep (DINOv2 D-Attn, feature 24)")
    p.add_argument("--no_decode", "--no-decode", action="store_true", help="skip the decoding-alone run")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nproc", type=int, default=1, help="processes (gloo on CPU, NCCL on GPU: GPUs 0..N-1)")
    p.add_argument("--images", type=int, default=64, help="images in the generated dataset (rounded up to a "
                                                          "multiple of --classes)")
    p.add_argument("--classes", type=int, default=4, help="classes of the generated dataset")
    p.add_argument("--source_size", "--source-size",
                   type=int, default=1024, help="side of the generated PNG files (MVTec AD: 700-1024)")
    p.add_argument("--image_size", "--image-size", type=int, default=518, help="model input side S")
    p.add_argument("--batch_size", "--batch-size", type=int, default=8, help="images per forward pass and process")
    p.add_argument("--vision_width", "--vision-width", type=int, default=1024,
                   help="CLIP vision width of the full model (ViT-L/14: 1024, 16 heads of 64)")
    p.add_argument("--vision_layers", "--vision-layers",
                   type=int, default=24, help="CLIP vision blocks of the full model")
    p.add_argument("--num_workers", "--num-workers",
                   type=int, default=None, help="loader workers per process (default: test.py's)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the image side (full model)")
    p.add_argument("--dattn_batch_mean", "--dattn-batch-mean", action="store_true",
                   help="Crane+ with the published batch-wide D-Attn mean (test.sh; batches of at most 8)")
    p.add_argument("--save_maps", "--save-maps",
                   action="store_true", help="also write every map (.npy), as test.py --save_maps")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the dataset and the results go (kept; default: a temporary folder, removed)")
    p.add_argument("--output", type=Path, default=None, help="also write the figures to this JSON file")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    problem = precision_error(args.precision, args.device)
    if args.nproc < 1 or args.images < 1 or args.classes < 1 or args.batch_size < 1:
        problem = "--nproc, --images, --classes and --batch_size must be at least 1"
    if args.device == "cuda" and not torch.cuda.is_available():
        problem = "--device cuda: no CUDA GPU here"
    elif args.device == "cuda" and args.nproc > torch.cuda.device_count():
        problem = f"--nproc {args.nproc}: this machine has {torch.cuda.device_count()} GPU(s)"
    if problem:
        print(f"bench_throughput.py: error: {problem}", file=sys.stderr)
        return 2
    from crane.logs import setup_logging

    setup_logging()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="crane_bench_"))
    try:
        data_root = work / "data"
        _, n = make_dataset(data_root, args.images, args.classes, args.source_size)
        results = []
        for variant in args.variants:
            plan = variant_plan(args, variant, data_root, work)
            for model in ([] if args.no_decode else ["decode"]) + list(args.models):
                results.append(run_one(args, plan, variant, model, work))
        table = report(results)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"\n{n} images of {args.source_size} px at S = {args.image_size}, batch {args.batch_size}, "
          f"{args.nproc} process(es) on {args.device}, {args.precision}{', compiled' if args.compile else ''}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs"
          + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    print(table)
    if args.output:
        args.output.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
