"""Evaluation of a Crane / Crane+ checkpoint on one dataset (the engine behind ``test.py``).

For each class of the dataset's ``test`` split: predict every image (sharded
across processes when several run), gather scores and smoothed maps on rank 0,
compute the six metrics of method.md section 7 with :mod:`crane.metrics`, and
persist the class (``classes/CLASS.json``, plus its maps and panels) atomically.
A restarted run skips the classes already finished with the same settings.
Then ``metrics.json``, ``metrics.md`` and ``predictions.csv`` are assembled
from the per-class files.

Which images count:

* image metrics (AUROC, AP, F1-max): every image of the class; a class whose
  images are all anomalous (or all normal) has them undefined (``null``);
* pixel metrics (AUROC, AUPRO, F1-max): the images with a mask file plus the
  normal images; anomalous images without a mask (image-only sets) are left out,
  and a class with no mask at all has them undefined.

Means are over the classes where a metric is defined.

Processes: ``devices`` with more than one entry spawns one process per entry
(:func:`crane.engine.distributed.launch`); under ``torchrun`` the processes
already exist. The images of a class are cut into batches of ``batch_size`` in
dataset order and the batches are dealt out round-robin, so every batch holds
the same images whatever the number of processes, and the results equal a
single-process run (bit for bit when each process computes with the same number
of CPU threads; matrix products round differently with other thread counts).

Published batching: with ``dattn_batch_mean`` (Crane+ as the published
evaluation ran it), an image's map depends on its batch mates, so the batches
are the published ones: consecutive runs of 8 images of the whole test split in
``meta.json`` order, across class boundaries (:func:`published_batches`), whatever
the number of processes. A class whose first or last batch shares images with a
neighbouring class is computed with those batch mates, so a resumed run gives the
same files.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from crane import metrics
from crane.cli_args import ATTN_TYPES, AUPRO_METHODS, DINO_MODELS, IMAGE_TOKEN_TYPES, default_datasets_root
from crane.data.dataset import CraneDataset, DatasetError
from crane.data.image import load_rgb
from crane.engine import results
from crane.engine.distributed import (DistContext, barrier, broadcast_from_main, gather_to_main, init_distributed,
                                      launch)
from crane.models.crane import CraneConfig
from crane.models.errors import CheckpointMismatchError, WeightsNotFoundError
from crane.models.head import smooth_maps

log = logging.getLogger(__name__)


class EvalError(ValueError):
    """A setting of the evaluation is unusable (missing checkpoint or weights, bad option)."""


USER_ERRORS = (EvalError, DatasetError, WeightsNotFoundError, CheckpointMismatchError)
"""Errors caused by the input (reported as one message, exit code 2 in ``test.py``)."""


@dataclass
class EvalOptions:
    """Everything ``test.py`` accepts, named as its flags (see ``python test.py --help``)."""

    dataset: str = "mvtec"
    datasets_root_dir: str = field(default_factory=default_datasets_root)
    model_name: str = "trained_on_mvtec_default"
    epoch: int = 5
    checkpoint: Optional[str] = None
    save_path: Optional[str] = None
    clip_weights: str = "openai"
    dino_weights: Optional[str] = None
    device: str = "cpu"
    devices: Sequence[int] = (0,)
    batch_size: int = 8
    num_workers: Optional[int] = None
    features_list: Sequence[int] = (24,)
    dino_model: str = "dinov2"
    soft_mean: bool = False
    image_size: int = 518
    sigma: float = 4
    attn_type: str = "qq+kk+vv"
    both_eattn_dattn: bool = True
    use_scorebase_pooling: bool = True
    dattn_batch_mean: bool = False
    train_with_img_cls_prob: float = 0.0
    train_with_img_cls_type: str = "pad_suffix"
    n_ctx: int = 12
    depth: int = 9
    t_n_ctx: int = 4
    k_shot: int = 0
    portion: float = 1.0
    seed: int = 111
    aupro_method: str = "crane"
    save_maps: bool = False
    visualize: bool = False
    why: Optional[str] = None
    type: str = "test"
    aug_rate: float = 0.0


PUBLISHED_BATCH = 8
"""Images per D-Attn batch in the published evaluation (8 per GPU, consecutive in meta.json order)."""


@dataclass
class EvalPlan:
    """What a run will do, decided once (on rank 0) before any model work."""

    root: Path
    checkpoint: Path
    save_path: Path
    settings: dict[str, Any]
    classes: list[str]
    pending: list[str]
    batches: dict[str, list[list[int]]]  # pending class -> its batches (dataset indices)
    why: Optional[str] = None


# --------------------------------------------------------------------------- planning


def checkpoint_path(opts: EvalOptions) -> Path:
    """``--checkpoint``, else ``checkpoints/MODEL_NAME/epoch_EPOCH.pth``."""
    return Path(opts.checkpoint) if opts.checkpoint else Path("checkpoints") / opts.model_name / f"epoch_{opts.epoch}.pth"


def save_path(opts: EvalOptions) -> Path:
    """``--save_path``, else ``results/MODEL_NAME/test_on_DATASET``."""
    return Path(opts.save_path) if opts.save_path else Path("results") / opts.model_name / f"test_on_{opts.dataset}"


def result_settings(opts: EvalOptions) -> dict[str, Any]:
    """The options that determine the numbers (recorded as ``args`` in ``metrics.json``).

    How the run is executed (devices, batch size, workers, output folder, whether
    maps or panels are saved) is left out, so equal results give equal files; the
    batch size counts only with ``dattn_batch_mean``, where it changes the maps.
    """
    settings = {
        "dataset": opts.dataset,
        "dataset_dir": str(Path(opts.datasets_root_dir) / opts.dataset),
        "model_name": opts.model_name,
        "checkpoint": str(checkpoint_path(opts)),
        "clip_weights": str(opts.clip_weights),
        "dino_model": opts.dino_model,
        "dino_weights": None if opts.dino_model == "none" or opts.dino_weights is None else str(opts.dino_weights),
        "features_list": [int(f) for f in opts.features_list],
        "soft_mean": bool(opts.soft_mean),
        "image_size": int(opts.image_size),
        "sigma": float(opts.sigma),
        "attn_type": opts.attn_type,
        "both_eattn_dattn": bool(opts.both_eattn_dattn),
        "use_scorebase_pooling": bool(opts.use_scorebase_pooling),
        "dattn_batch_mean": bool(opts.dattn_batch_mean),
        "train_with_img_cls_prob": float(opts.train_with_img_cls_prob),
        "train_with_img_cls_type": opts.train_with_img_cls_type,
        "n_ctx": int(opts.n_ctx),
        "depth": int(opts.depth),
        "t_n_ctx": int(opts.t_n_ctx),
        "k_shot": int(opts.k_shot),
        "portion": float(opts.portion),
        "seed": int(opts.seed),
        "aupro_method": opts.aupro_method,
    }
    if published_batching(opts):
        settings["batch_size"] = min(PUBLISHED_BATCH, int(opts.batch_size))
    return settings


def _check_options(opts: EvalOptions) -> None:
    choices = {"dino_model": DINO_MODELS, "attn_type": ATTN_TYPES, "train_with_img_cls_type": IMAGE_TOKEN_TYPES,
               "aupro_method": AUPRO_METHODS, "device": ("cpu", "cuda")}
    for name, allowed in choices.items():
        if getattr(opts, name) not in allowed:
            raise EvalError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(opts, name)!r}")
    if opts.train_with_img_cls_prob not in (0, 1):
        raise EvalError(f"--train_with_img_cls_prob must be 0 (published evaluation: one text pair for all images) "
                        f"or 1 (prompts conditioned on each image) at test, got {opts.train_with_img_cls_prob}")
    if opts.batch_size < 1 or opts.image_size < 14 or not opts.devices:
        raise EvalError("--batch_size must be >= 1, --image_size >= 14 and --devices must list at least one index")
    if not opts.features_list:
        raise EvalError("--features_list needs at least one layer")
    checkpoint = checkpoint_path(opts)
    if not checkpoint.is_file():
        raise EvalError(f"checkpoint not found: {checkpoint}; pass --checkpoint FILE, or put the official checkpoint "
                        f"there (checkpoints/MODEL_NAME/epoch_N.pth with --model_name/--epoch)")
    if opts.clip_weights not in ("openai", "synthetic") and not Path(opts.clip_weights).expanduser().is_file():
        raise EvalError(f"CLIP weights file not found: {opts.clip_weights}; pass --clip_weights openai (cached "
                        f"download), a ViT-L-14-336px.pt file, or synthetic")
    if opts.dino_model != "none" and opts.dino_weights not in (None, "synthetic") and \
            not Path(opts.dino_weights).expanduser().is_file():
        raise EvalError(f"--dino_weights file not found: {opts.dino_weights}")
    if opts.clip_weights == "openai":
        from crane.models.clip_loader import resolve_openai_weights

        resolve_openai_weights()  # raises WeightsNotFoundError (what to fetch, where) before any process starts
    if opts.dino_model != "none" and opts.dino_weights is None:
        from crane.models.vfm import resolve_vfm_weights

        resolve_vfm_weights(opts.dino_model)


def published_batching(opts: EvalOptions) -> bool:
    """Whether batches must be the published ones (the batch-wide D-Attn mean makes maps batch-dependent)."""
    return bool(opts.dattn_batch_mean) and opts.dino_model != "none"


def published_batches(n: int, batch_size: int = PUBLISHED_BATCH) -> list[list[int]]:
    """The published test loader's batches over ``n`` images: consecutive runs of ``batch_size``."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def class_batches(dataset: CraneDataset, classes: Sequence[str], opts: EvalOptions) -> dict[str, list[list[int]]]:
    """Each class's batches (indices into ``dataset``, in dataset order).

    Batch-invariant runs cut each class into batches of ``batch_size``; published batching
    (:func:`published_batching`) uses the runs of :func:`published_batches` over the whole
    dataset that hold an image of the class (so a boundary batch brings in other classes).
    """
    by_class: dict[str, list[int]] = {}
    for i, sample in enumerate(dataset.samples):
        by_class.setdefault(sample["cls_name"], []).append(i)
    if not published_batching(opts):
        size = opts.batch_size
        return {c: [by_class[c][i:i + size] for i in range(0, len(by_class[c]), size)] for c in classes}
    runs = published_batches(len(dataset), min(PUBLISHED_BATCH, opts.batch_size))
    wanted = set(classes)
    out: dict[str, list[list[int]]] = {c: [] for c in classes}
    for run in runs:
        for c in dict.fromkeys(dataset.samples[i]["cls_name"] for i in run):
            if c in wanted:
                out[c].append(run)
    return out


def _class_file(save: Path, cls_name: str) -> Path:
    return save / "classes" / f"{cls_name}.json"


def _batch_paths(dataset: CraneDataset, batches: list[list[int]], opts: EvalOptions) -> Optional[list[list[str]]]:
    """The images of each batch, recorded with a class under published batching (its maps depend on them)."""
    if not published_batching(opts):
        return None
    return [[dataset.samples[i]["img_path"] for i in b] for b in batches]


def _finished(record: Optional[dict], settings: dict, img_paths: list[str], batches: Optional[list[list[str]]],
              opts: EvalOptions) -> bool:
    """Whether a saved class record can be reused for this run."""
    return (isinstance(record, dict) and record.get("settings") == settings
            and [p["img_path"] for p in record.get("predictions", [])] == img_paths
            and record.get("batches") == batches
            and (record.get("maps_saved") or not opts.save_maps)
            and (record.get("visualized") or not opts.visualize))


def _dataset(opts: EvalOptions, root: Path, classes: Optional[list[str]] = None, validate: bool = True) -> CraneDataset:
    return CraneDataset(root, split="test", image_size=opts.image_size, k_shot=opts.k_shot, portion=opts.portion,
                        classes=classes, seed=opts.seed, validate=validate)


def prepare(opts: EvalOptions) -> EvalPlan:
    """Check the options, the weights, the checkpoint and the dataset (every pending image decoded),
    and find the classes still to do. Raises ``EvalError``, ``DatasetError`` or ``WeightsNotFoundError``
    with a clear message."""
    _check_options(opts)
    root = Path(opts.datasets_root_dir) / opts.dataset
    dataset = _dataset(opts, root)
    settings = result_settings(opts)
    save = save_path(opts)
    pending, stale = [], []
    every = class_batches(dataset, dataset.classes, opts)
    for cls_name in dataset.classes:
        img_paths = [s["img_path"] for s in dataset.samples if s["cls_name"] == cls_name]
        record = results.read_json(_class_file(save, cls_name))
        if not _finished(record, settings, img_paths, _batch_paths(dataset, every[cls_name], opts), opts):
            pending.append(cls_name)
            if record is not None:
                stale.append(cls_name)
    if stale:
        log.warning("%s holds results of %s from other settings, images or outputs: recomputing them",
                    save, ", ".join(stale))
    batches = {c: every[c] for c in pending}
    needed = sorted({i for runs in batches.values() for run in runs for i in run})
    dataset.validate(decode=True, indices=needed)
    return EvalPlan(root, checkpoint_path(opts), save, settings, dataset.classes, pending, batches, opts.why)


# -------------------------------------------------------------------------- inference


def build_detector(opts: EvalOptions, checkpoint: Path, device: torch.device):
    """The :class:`crane.Detector` for these options on ``device``."""
    from crane.detector import Detector, build_model

    model = build_model(opts.clip_weights, str(checkpoint), opts.dino_weights, CraneConfig.from_options(opts))
    return Detector(model, device, batch_size=opts.batch_size)


def predict_batch(detector, images: torch.Tensor, image_token_type: Optional[str] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed ``B x 3 x S x S`` -> (scores ``B``, smoothed maps ``B x S x S``), float32 numpy.

    ``image_token_type``: see :meth:`crane.Detector.predict_tensor`.
    """
    scores, raw = detector.predict_tensor(images, image_token_type)
    return scores.numpy(), smooth_maps(raw.numpy(), detector.config.sigma)


def _round_robin(batches: list[list[int]], ctx: DistContext) -> tuple[list[list[int]], int]:
    """This rank's share of ``batches`` and the number of gather rounds."""
    return batches[ctx.rank::ctx.world_size], math.ceil(len(batches) / ctx.world_size)


def _num_workers(opts: EvalOptions, ctx: DistContext) -> int:
    if opts.num_workers is not None:
        return opts.num_workers
    if ctx.device.type != "cuda":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    return min(8, max(1, (os.cpu_count() or 1) // local - 1))


def _predict_batches(detector, dataset: CraneDataset, batches: list[list[int]], ctx: DistContext, opts: EvalOptions,
                     sink: Optional[Callable[[dict], None]], desc: str, total: int) -> None:
    """Predict ``batches`` (lists of indices into ``dataset``, each run as one forward pass) across all
    ranks; rank 0's ``sink`` receives every batch as ``{"index", "score", "map", "mask"}`` (dataset
    indices, ``B``, ``B x S x S`` float32, ``B x S x S`` uint8), in order. ``total``: images the
    progress bar counts."""
    mine, rounds = _round_robin(batches, ctx)
    workers = _num_workers(opts, ctx)
    loader = iter(DataLoader(dataset, batch_sampler=mine, num_workers=workers,
                             pin_memory=ctx.device.type == "cuda", persistent_workers=False))
    token_type = opts.train_with_img_cls_type if opts.train_with_img_cls_prob == 1 and \
        opts.train_with_img_cls_type != "none" else None
    bar = tqdm(total=total, desc=desc, unit="img", disable=not ctx.is_main, dynamic_ncols=True)
    for r in range(rounds):
        payload = None
        if r < len(mine):
            batch = next(loader)
            scores, maps = predict_batch(detector, batch["img"], token_type)
            payload = {"index": mine[r], "score": scores, "map": maps,
                       "mask": batch["img_mask"].numpy().astype(np.uint8)}
        gathered = gather_to_main(payload, ctx)
        if ctx.is_main:
            for part in gathered:
                if part is not None:
                    sink(part)
                    bar.update(len(part["index"]))
    bar.close()


# ---------------------------------------------------------------------------- metrics


def class_metrics(labels: np.ndarray, scores: np.ndarray, masks: Optional[np.ndarray], maps: Optional[np.ndarray],
                  aupro_method: str = "crane", desc: str = "metrics") -> dict[str, Optional[float]]:
    """The six metrics of one class; ``None`` where undefined.

    Args:
        labels: ``N`` {0, 1} image labels; scores: ``N`` image scores (all images of the class).
        masks, maps: ``M x S x S`` ground truth {0, 1} and smoothed maps of the images that
            enter the pixel metrics, or ``None`` when the class has no mask (pixel metrics undefined).
        aupro_method: ``"crane"`` (published 200-threshold AUPRO) or ``"mvtec"`` (MVTec AD
            official: every distinct score a threshold).
    """
    jobs: dict[str, Callable[[], float]] = {
        "image_auroc": lambda: metrics.image_auroc(labels, scores),
        "image_ap": lambda: metrics.image_ap(labels, scores),
        "image_f1": lambda: metrics.image_f1_max(labels, scores),
    }
    if masks is not None:
        num_thresholds = 200 if aupro_method == "crane" else None
        jobs.update({
            "pixel_auroc": lambda: metrics.pixel_auroc(masks, maps),
            "pixel_aupro": lambda: metrics.aupro(masks, maps, method=aupro_method, num_thresholds=num_thresholds),
            "pixel_f1": lambda: metrics.pixel_f1_max(masks, maps),
        })
    out: dict[str, Optional[float]] = dict.fromkeys(results.METRICS)
    for name in tqdm(jobs, desc=desc, unit="metric", leave=False, dynamic_ncols=True):
        out[name] = results.defined(jobs[name]())
    return out


class _ClassCollector:
    """Rank 0's view of one class while its batches arrive: scores, the maps and masks that
    the pixel metrics need, and (optionally) every map for saving or panels."""

    def __init__(self, samples: list[dict], indices: list[int], size: int, maps_dir: Optional[Path],
                 keep_all_maps: bool) -> None:
        self.samples, self.maps_dir = samples, maps_dir
        self.position = {index: i for i, index in enumerate(indices)}
        n = len(samples)
        has_mask = np.array([bool(s["mask_path"]) for s in samples])
        labels = np.array([int(s["anomaly"]) for s in samples])
        self.labels = labels
        self.pixel = (has_mask | (labels == 0)) if has_mask.any() else np.zeros(n, bool)
        self.slot = np.cumsum(self.pixel) - 1  # position among the pixel-metric images
        self.scores = np.zeros(n, np.float32)
        self.masks = np.zeros((int(self.pixel.sum()), size, size), np.uint8)
        self.pixel_maps = np.zeros((int(self.pixel.sum()), size, size), np.float32)
        self.all_maps = np.zeros((n, size, size), np.float32) if keep_all_maps else None

    def add(self, part: dict) -> None:
        """Take a predicted batch; its images of other classes (published batch mates) are ignored."""
        for j, index in enumerate(part["index"]):
            i = self.position.get(index)
            if i is None:
                continue
            self.scores[i] = part["score"][j]
            if self.pixel[i]:
                self.masks[self.slot[i]] = part["mask"][j]
                self.pixel_maps[self.slot[i]] = part["map"][j]
            if self.all_maps is not None:
                self.all_maps[i] = part["map"][j]
            if self.maps_dir is not None:
                results.save_npy(self.maps_dir / Path(self.samples[i]["img_path"]).with_suffix(".npy"), part["map"][j])

    def metrics(self, aupro_method: str, desc: str) -> dict[str, Optional[float]]:
        with_pixels = bool(self.pixel.any())
        return class_metrics(self.labels, self.scores, self.masks if with_pixels else None,
                             self.pixel_maps if with_pixels else None, aupro_method, desc)

    def predictions(self) -> list[dict[str, Any]]:
        return [{"img_path": s["img_path"], "cls_name": s["cls_name"], "specie_name": s["specie_name"],
                 "anomaly": int(s["anomaly"]), "score": float(score)} for s, score in zip(self.samples, self.scores)]


def _visualize_class(collector: _ClassCollector, root: Path, out_dir: Path) -> None:
    """One panel per image (original | heat map | overlay) into ``out_dir/<folder>_<stem>.png``.

    The predicted region is outlined at the class's pixel F1-max threshold (the operating
    point of the ``pixel_f1`` metric), the ground truth in green; no outline without masks.
    """
    from crane.thresholds import max_f1_threshold
    from crane.visualize import save_panel

    masks = collector.masks
    threshold = max_f1_threshold(masks, collector.pixel_maps)[0] if masks.any() and not masks.all() else None
    for i, sample in enumerate(tqdm(collector.samples, desc="panels", unit="img", leave=False, dynamic_ncols=True)):
        gt = masks[collector.slot[i]] if sample["mask_path"] and collector.pixel[i] else None
        path = Path(sample["img_path"])
        save_panel(out_dir / f"{path.parent.name}_{path.stem}.png", load_rgb(root / path), collector.all_maps[i],
                   threshold=threshold, gt_mask=gt, score=float(collector.scores[i]), caption=sample["img_path"])


# ------------------------------------------------------------------------------- run


class _BoundaryBatches:
    """Batches shared by two pending classes (published batching): computed once, for the first
    class, and kept on rank 0 for the next. Every rank knows which batches were computed."""

    def __init__(self) -> None:
        self.done: set[tuple[int, ...]] = set()
        self.kept: dict[tuple[int, ...], dict] = {}

    def split(self, batches: list[list[int]]) -> tuple[list[dict], list[list[int]]]:
        """(rank 0's kept outputs of already computed batches, the batches still to compute)."""
        kept = [self.kept.pop(tuple(b)) for b in batches if tuple(b) in self.kept]
        return kept, [b for b in batches if tuple(b) not in self.done]

    def record(self, batches: list[list[int]], later: set[int]) -> Callable[[dict], None]:
        """Mark ``batches`` computed; the returned hook keeps the outputs of those that hold an
        image of ``later`` (dataset indices of the classes still to come)."""
        self.done.update(tuple(b) for b in batches)

        def keep(part: dict) -> None:
            if later.intersection(part["index"]):
                self.kept[tuple(part["index"])] = part
        return keep


def _process_class(cls_name: str, position: str, detector, dataset: CraneDataset, plan: EvalPlan,
                   opts: EvalOptions, ctx: DistContext, shared: _BoundaryBatches, later: set[int]) -> None:
    indices = [i for i, s in enumerate(dataset.samples) if s["cls_name"] == cls_name]
    kept, todo = shared.split(plan.batches[cls_name])
    keep = shared.record(todo, later)
    collector = None
    if ctx.is_main:
        samples = [dataset.samples[i] for i in indices]
        collector = _ClassCollector(samples, indices, opts.image_size,
                                    plan.save_path / "maps" if opts.save_maps else None, opts.visualize)
        for part in kept:
            collector.add(part)

    def sink(part: dict) -> None:
        keep(part)
        collector.add(part)

    _predict_batches(detector, dataset, todo, ctx, opts, sink if collector else None, f"{cls_name} {position}",
                     total=sum(len(b) for b in todo))
    if not ctx.is_main:
        return
    values = collector.metrics(opts.aupro_method, f"metrics {cls_name}")
    if opts.visualize:
        _visualize_class(collector, plan.root, plan.save_path / "visualization" / cls_name)
    results.write_json(_class_file(plan.save_path, cls_name), {
        "settings": plan.settings, "metrics": values, "predictions": collector.predictions(),
        "batches": _batch_paths(dataset, plan.batches[cls_name], opts),
        "maps_saved": opts.save_maps, "visualized": opts.visualize})


def summarize(plan: EvalPlan) -> str:
    """Assemble ``metrics.json``, ``metrics.md`` and ``predictions.csv`` from the class records;
    return the Markdown table."""
    records = {c: results.read_json(_class_file(plan.save_path, c)) for c in plan.classes}
    per_class = {c: records[c]["metrics"] for c in plan.classes}
    mean = {m: results.mean_defined(v[m] for v in per_class.values()) for m in results.METRICS}
    results.write_json(plan.save_path / "metrics.json", {"classes": per_class, "mean": mean, "args": plan.settings,
                                                         "why": plan.why})
    rows = [dict(p, score=str(np.float32(p["score"]))) for c in plan.classes for p in records[c]["predictions"]]
    results.write_csv(plan.save_path / "predictions.csv", results.PREDICTION_COLUMNS, rows)
    table = results.metrics_table(per_class, mean)
    results.write_text(plan.save_path / "metrics.md", f"# {plan.settings['dataset']} ({plan.settings['model_name']}, "
                                                      f"AUPRO: {plan.settings['aupro_method']})\n\n{table}\n")
    return table


def _plan_on_main(opts: EvalOptions, ctx: DistContext) -> EvalPlan:
    """Rank 0 prepares the plan; every rank gets it, or the same error."""
    plan, error = None, None
    if ctx.is_main:
        try:
            plan = prepare(opts)
        except USER_ERRORS as e:
            error = str(e)
    plan, error = broadcast_from_main((plan, error), ctx)
    if error:
        raise EvalError(error)
    return plan


def _set_cpu_threads(ctx: DistContext) -> None:
    if ctx.device.type == "cpu" and ctx.distributed and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def worker(opts: EvalOptions, plan: Optional[EvalPlan] = None) -> None:
    """One process of an evaluation (the only one, or one rank of many)."""
    torch_launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    ctx = init_distributed(opts.device, list(opts.devices) if not torch_launched or len(opts.devices) > 1 else None)
    _set_cpu_threads(ctx)
    if plan is None:
        plan = _plan_on_main(opts, ctx)
    if ctx.is_main:
        done = len(plan.classes) - len(plan.pending)
        if done:
            log.warning("resuming in %s: %d of %d classes already finished with these settings",
                        plan.save_path, done, len(plan.classes))
    if plan.pending:
        torch.manual_seed(opts.seed)
        detector = build_detector(opts, plan.checkpoint, ctx.device)
        dataset = _dataset(opts, plan.root, validate=False)
        shared = _BoundaryBatches()
        for k, cls_name in enumerate(plan.pending):
            later = {i for i, s in enumerate(dataset.samples) if s["cls_name"] in plan.pending[k + 1:]}
            _process_class(cls_name, f"[{k + 1}/{len(plan.pending)}]", detector, dataset, plan, opts, ctx, shared,
                           later)
    barrier(ctx)
    if ctx.is_main:
        print(summarize(plan), flush=True)
        print(f"results in {plan.save_path}", flush=True)


def evaluate(opts: EvalOptions) -> Path:
    """Run the evaluation described by ``opts``; return the folder holding the results.

    With several ``devices`` (and not already under ``torchrun``) one process per device
    is spawned. Raises ``EvalError``, ``DatasetError``, ``WeightsNotFoundError`` or
    ``CheckpointMismatchError`` with a one-line message for unusable input.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        try:
            worker(opts)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    else:
        plan = prepare(opts)
        launch(worker, len(opts.devices), opts, plan)
    return save_path(opts)
