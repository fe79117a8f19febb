"""Evaluation of a Crane / Crane+ checkpoint on one dataset (the engine behind ``test.py``).

For each class of the dataset's ``test`` split: predict every image (sharded
across processes when several run), gather scores and smoothed maps on rank 0,
compute the six metrics of docs/method.md §7 with :mod:`crane.metrics`, and
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

import dataclasses
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from crane import metrics, settings
from crane.checkpoints import CheckpointInfo, apply_settings, named_checkpoint, read_checkpoint
from crane.data.dataset import CraneDataset
from crane.data.decode import Damaged, check_image
from crane.data.image import PREPROCESSING, load_rgb
from crane.data.meta import default_datasets_root
from crane.detector import build_detector
from crane.device import precision_error, resolve_device
from crane.engine import results
from crane.engine.few_shot import draw_references, seed_folder, summarize_seeds
from crane.engine.distributed import (DistContext, barrier, broadcast_from_main, gather_batches, init_distributed,
                                      launch)
from crane.engine.timing import StageTimer
from crane.errors import CraneError
from crane.files import file_identity, is_identity, output_problem
from crane.logs import progress, setup_logging
from crane.models.prompts import prompt_shape_problem
from crane.models.smoothing import smooth
from crane.models.weights import clip_depth, text_width_of, tower_depth_of, weights_file, weights_problems
from crane.settings import AUPRO_METHODS

log = logging.getLogger(__name__)


class EvalError(CraneError):
    """A setting of the evaluation is unusable (missing checkpoint or weights, bad option)."""


@dataclass
class EvalRun:
    """Everything ``test.py`` accepts besides the model settings, named as its flags."""

    dataset: str = "mvtec"
    datasets_root_dir: str = field(default_factory=default_datasets_root)
    model_name: str = "trained_on_mvtec_default"
    epoch: int = 5
    checkpoint: Optional[str] = None
    save_path: Optional[str] = None
    device: str = "auto"
    devices: Optional[Sequence[int]] = None
    batch_size: int = 8
    num_workers: Optional[int] = None
    precision: str = "fp32"
    compile: bool = False
    k_shot: int = 0
    portion: float = 1.0
    seed: int = 111
    aupro_method: str = "crane"
    save_maps: bool = False
    visualize: bool = False
    why: Optional[str] = None
    type: str = "test"
    aug_rate: float = 0.0
    force: bool = False
    preprocessing: str = "crane"
    metrics_as_published: bool = False
    profile: Optional[str] = None
    few_shot: int = 0
    few_shot_seeds: Optional[Sequence[int]] = None
    coreset_ratio: float = settings.DEFAULT_CORESET_RATIO
    few_shot_weight: float = settings.DEFAULT_FEW_SHOT_WEIGHT
    explicit: frozenset = frozenset()  # model flags given on the command line (the rest may come from the checkpoint)


EvalOptions = settings.with_settings(EvalRun, "test", "EvalOptions")
"""Everything ``test.py`` accepts, named as its flags (see ``python test.py --help``): :class:`EvalRun` and
the model settings of the ``test`` context (:data:`crane.settings.SETTINGS`)."""


PUBLISHED_BATCH = 8
"""Images per D-Attn batch in the published evaluation (8 per GPU, consecutive in meta.json order)."""


@dataclass
class EvalPlan:
    """What a run will do, decided once (on rank 0) before any model work; ``opts`` are the options
    with the checkpoint's model settings filled in (what every rank runs)."""

    opts: EvalOptions
    root: Path
    checkpoint: Path
    save_path: Path
    settings: dict[str, Any]
    classes: list[str]
    pending: list[str]
    batches: dict[str, list[list[int]]]  # pending class -> its batches (dataset indices)
    inputs: dict[str, list[list]]  # pending class -> identities of the images its numbers depend on
    run: dict[str, Any] = field(default_factory=dict)  # names and places, recorded in metrics.json
    checkpoint_state: dict[str, Any] = field(default_factory=dict)  # the prompt learner, read once in prepare
    references: dict[str, list[list]] = field(default_factory=dict)  # few-shot: class -> [[img_path, identity]]



# --------------------------------------------------------------------------- planning


def checkpoint_path(opts: EvalOptions) -> Path:
    """``--checkpoint``, else ``checkpoints/MODEL_NAME/epoch_EPOCH.pth`` (here, else the shipped one:
    :func:`crane.checkpoints.named_checkpoint`)."""
    return Path(opts.checkpoint) if opts.checkpoint else named_checkpoint(opts.model_name, opts.epoch)


def run_name(opts: EvalOptions, info: Optional[CheckpointInfo] = None) -> str:
    """The name results go under: ``--model_name``, or with ``--checkpoint FILE`` the checkpoint's run
    (the official run it is, else its folder's name)."""
    if opts.checkpoint is None:
        return opts.model_name
    return info.run_name if info is not None else Path(opts.checkpoint).resolve().parent.name


def save_path(opts: EvalOptions, info: Optional[CheckpointInfo] = None) -> Path:
    """``--save_path``, else ``results/RUN_NAME/test_on_DATASET`` (:func:`run_name`); few-shot runs
    (``--few_shot K``) default to ``results/RUN_NAME/test_on_DATASET_fewshot_K``, each seed in its own
    ``seed_S/`` below it (:func:`run_folder`)."""
    if opts.save_path:
        return Path(opts.save_path)
    suffix = f"_fewshot_{opts.few_shot}" if opts.few_shot > 0 else ""
    return Path("results") / run_name(opts, info) / f"test_on_{opts.dataset}{suffix}"


def few_shot_seeds(opts: EvalOptions) -> list[int]:
    """The seeds of the reference draws: ``--few_shot_seeds``, else the one value of ``--seed``."""
    return [int(s) for s in (opts.few_shot_seeds or [opts.seed])]


def run_folder(opts: EvalOptions, info: Optional[CheckpointInfo] = None) -> Path:
    """Where one run's files go: :func:`save_path`, for a few-shot run its seed's folder (one seed per run)."""
    base = save_path(opts, info)
    return seed_folder(base, few_shot_seeds(opts)[0]) if opts.few_shot > 0 else base


def weights_identity(weights: Optional[str], kind: str, clip_model: str = settings.DEFAULT_CLIP_MODEL
                     ) -> Optional[str]:
    """What identifies the CLIP (``kind="clip"``, of tower ``clip_model``) or VFM (the ``dino_model``) weights a
    run uses: the :func:`crane.files.file_identity` of the file (the cached file for a pretrained tag such as
    ``openai`` / ``None``), or the tag ``synthetic``."""
    path = weights_file(kind, weights, clip_model)
    return path if path in (None, "synthetic") else file_identity(Path(path).expanduser())


def result_settings(opts: EvalOptions, info: CheckpointInfo) -> dict[str, Any]:
    """What determines the numbers, by content (compared on resume; recorded as ``args`` in ``metrics.json``).

    The checkpoint counts by its SHA-256 and the weights by file identity, not by name;
    the images count per class (see :func:`_sample_identities`). How the run is executed
    (devices, batch size, workers, output folder, whether maps or panels are saved) is
    left out, so equal results give equal files; the batch size counts only with published
    batching, where it changes the maps. The precision counts (bf16 / fp16 change the numbers);
    ``compile`` does not (it only reorders float operations, as other thread counts do).
    """
    recorded = settings.recorded(opts, "results")
    recorded["clip_weights"] = weights_identity(opts.clip_weights, "clip", opts.clip_model)
    recorded["dino_weights"] = None if opts.dino_model == "none" else weights_identity(opts.dino_weights,
                                                                                       opts.dino_model)
    run_settings = {"dataset": opts.dataset, "checkpoint_sha256": info.sha256, **recorded,
                    "k_shot": int(opts.k_shot), "portion": float(opts.portion), "seed": int(opts.seed),
                    "aupro_method": opts.aupro_method, "preprocessing": opts.preprocessing,
                    "metrics_as_published": bool(opts.metrics_as_published), "precision": opts.precision}
    if published_batching(opts):
        run_settings["batch_size"] = min(PUBLISHED_BATCH, int(opts.batch_size))
    if opts.few_shot > 0:  # zero-shot runs keep the keys (and resume key) they always had
        run_settings.update(few_shot=int(opts.few_shot), few_shot_seed=few_shot_seeds(opts)[0],
                            coreset_ratio=float(opts.coreset_ratio), few_shot_weight=float(opts.few_shot_weight))
    return run_settings


def _sample_identities(root: Path, samples: Sequence[dict]) -> list[list]:
    """``[img_path, image identity, mask identity]`` of each sample (what a class's numbers depend on; the
    identities by content, :func:`crane.files.file_identity`)."""
    return [[s["img_path"], file_identity(root / s["img_path"]),
             file_identity(root / s["mask_path"]) if s["mask_path"] else None] for s in samples]


def _check_options(opts: EvalOptions) -> None:
    """The run flags, the checkpoint's existence and the weights: all problems in one :class:`EvalError`."""
    problems = []
    choices = {"aupro_method": AUPRO_METHODS, "preprocessing": PREPROCESSING}
    for name, allowed in choices.items():
        if getattr(opts, name) not in allowed:
            problems.append(f"--{name} must be one of {', '.join(allowed)}, got {getattr(opts, name)!r}")
    if opts.batch_size < 1:
        problems.append(f"--batch_size must be >= 1, got {opts.batch_size}")
    if opts.few_shot < 0:
        problems.append(f"--few_shot must be >= 0 (0: zero-shot), got {opts.few_shot}")
    elif opts.few_shot == 0 and opts.few_shot_seeds:
        problems.append("--few_shot_seeds needs --few_shot K (the reference images per class)")
    elif opts.few_shot_seeds is not None and len(set(opts.few_shot_seeds)) != len(opts.few_shot_seeds):
        problems.append(f"--few_shot_seeds repeats a seed: {' '.join(map(str, opts.few_shot_seeds))}")
    try:
        opts.device, opts.devices = resolve_device(opts.device, opts.devices)
    except CraneError as e:
        problems.append(str(e))
    else:
        problem = precision_error(opts.precision, opts.device)
        if problem:
            problems.append(problem)
    checkpoint = checkpoint_path(opts)
    if not checkpoint.is_file():
        problems.append(f"checkpoint not found: {checkpoint}; pass --checkpoint FILE, or --model_name NAME --epoch N "
                        "for checkpoints/NAME/epoch_N.pth (shipped: trained_on_{mvtec,visa}_{crane,cranep}, epochs 1-5)")
    if opts.save_path:
        problems += [p for p in [output_problem(opts.save_path, folder=True, flag="--save_path")] if p]
    if problems:
        raise EvalError("; ".join(problems))


def _check_model_options(opts: EvalOptions) -> None:
    """The model settings, after the checkpoint's are filled in (:func:`crane.settings.problems`), the
    layers against the tower (read from the weights file, else ``--clip_model``'s), and the weights (the
    CLIP weights of the tower the checkpoint records or the flag names)."""
    problems = settings.problems(opts, "test")
    clip = weights_problems(opts.clip_weights, "none", None, opts.clip_model)
    if not problems and not clip:
        problems += settings.layer_problems(opts.features_list, clip_depth(str(opts.clip_weights), opts.clip_model),
                                            f"{opts.clip_model} {opts.clip_weights}")
    problems += clip + weights_problems("synthetic", opts.dino_model, opts.dino_weights)
    if problems:
        raise EvalError("; ".join(problems))


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


def _finished(record: Optional[dict], settings: dict, img_paths: list[str], inputs: list[list],
              batches: Optional[list[list[str]]], opts: EvalOptions, references: Optional[list[list]] = None) -> bool:
    """Whether a saved class record can be reused for this run: same settings (checkpoint and weights
    by content), same images and masks (by content, :func:`crane.files.file_identity`), same batches,
    same few-shot reference images (by content)."""
    return (isinstance(record, dict) and record.get("settings") == settings
            and [p["img_path"] for p in record.get("predictions", [])] == img_paths
            and record.get("inputs") == inputs and record.get("batches") == batches
            and record.get("references") == references
            and (record.get("maps_saved") or not opts.save_maps)
            and (record.get("visualized") or not opts.visualize))


def _old_format(record: Optional[dict]) -> bool:
    """Whether a class record keys its images in the format before content identities (``size:mtime``)."""
    inputs = record.get("inputs") if isinstance(record, dict) else None
    return bool(inputs) and not all(is_identity(row[1]) for row in inputs if isinstance(row, list) and len(row) > 1)


def _dataset(opts: EvalOptions, root: Path, classes: Optional[list[str]] = None, validate: bool = True) -> CraneDataset:
    return CraneDataset(root, split="test", image_size=opts.image_size, k_shot=opts.k_shot, portion=opts.portion,
                        classes=classes, seed=opts.seed, validate=validate, preprocessing=opts.preprocessing)


def prepare(opts: EvalOptions) -> EvalPlan:
    """Check the options, the weights, the checkpoint and the dataset (every pending image decoded),
    and find the classes still to do. Raises ``EvalError``, ``DatasetError`` or ``WeightsNotFoundError``
    with a clear message."""
    opts = dataclasses.replace(opts)
    _check_options(opts)
    state, info = read_checkpoint(checkpoint_path(opts))
    for note in apply_settings(opts, opts.explicit, info, opts.force):
        log.warning("%s", note)
    settings.scale_to_tower(opts, tower_depth_of(opts.clip_model, opts.clip_weights), opts.explicit | set(info.settings))
    _check_model_options(opts)
    problem = prompt_shape_problem(state, opts.n_ctx, opts.t_n_ctx, opts.depth, text_width_of(opts.clip_model, opts.clip_weights),
                                   info.settings.get("clip_model"))
    if problem:
        raise EvalError(f"{checkpoint_path(opts)}: {problem}")
    root = Path(opts.datasets_root_dir) / opts.dataset
    dataset = _dataset(opts, root)
    recorded = result_settings(opts, info)
    save = run_folder(opts, info)
    references = _reference_identities(opts, root, dataset.classes)
    pending, stale, old, identities = [], [], [], {}
    every = class_batches(dataset, dataset.classes, opts)
    for cls_name in dataset.classes:
        mine = [s for s in dataset.samples if s["cls_name"] == cls_name]
        inputs = _sample_identities(root, mine if not published_batching(opts) else
                                    [dataset.samples[i] for i in sorted({i for b in every[cls_name] for i in b})])
        identities[cls_name] = inputs
        record = results.read_json(_class_file(save, cls_name))
        if not _finished(record, recorded, [s["img_path"] for s in mine], inputs,
                         _batch_paths(dataset, every[cls_name], opts), opts, references.get(cls_name)):
            pending.append(cls_name)
            if _old_format(record):
                old.append(cls_name)
            elif record is not None:
                stale.append(cls_name)
    if old:
        log.warning("%s holds results of %s recorded by an older crane, which compared images by size and "
                    "modification time: recomputing them once, now keyed on content", save, ", ".join(old))
    if stale:
        log.warning("%s holds results of %s from other settings, images or outputs: recomputing them",
                    save, ", ".join(stale))
    batches = {c: every[c] for c in pending}
    needed = sorted({i for runs in batches.values() for run in runs for i in run})
    dataset.validate(decode=True, indices=needed)
    run = {"run_name": run_name(opts, info), "checkpoint": str(checkpoint_path(opts)), "checkpoint_source": info.source,
           "dataset_dir": str(root), "clip_weights": str(opts.clip_weights), "dino_weights": opts.dino_weights,
           "why": opts.why}
    return EvalPlan(opts, root, checkpoint_path(opts), save, recorded, dataset.classes, pending, batches,
                    {c: identities[c] for c in pending}, run, state, references)


def _reference_identities(opts: EvalOptions, root: Path, classes: Sequence[str]) -> dict[str, list[list]]:
    """Few-shot: ``{class: [[img_path, identity], ...]}`` of the reference images drawn for this run's seed
    (:func:`crane.engine.few_shot.draw_references`), each decoded once here; zero-shot: ``{}``."""
    if opts.few_shot <= 0:
        return {}
    drawn = draw_references(root, classes, opts.few_shot, few_shot_seeds(opts)[0])
    out = {}
    for cls_name, paths in drawn.items():
        for path in paths:
            try:
                check_image(root / path)
            except (OSError, Damaged) as e:
                raise EvalError(f"reference image {root / path} (train split of class {cls_name!r}) cannot be "
                                f"read: {e}") from None
        out[cls_name] = [[path, file_identity(root / path)] for path in paths]
    return out


# -------------------------------------------------------------------------- inference


def predict_batch(detector, images: torch.Tensor, image_token_type: Optional[str] = None,
                  timer: Optional[StageTimer] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed ``B x 3 x S x S`` -> (scores ``B``, smoothed maps ``B x S x S``), float32, on the
    detector's device (the smoothing runs there too).

    ``image_token_type``: see :meth:`crane.Detector.predict_tensor`.
    """
    timer = timer or StageTimer()
    with timer("model"):
        scores, raw = detector.forward(images, image_token_type)
    with timer("smoothing"):
        maps = smooth(raw, detector.config.sigma)
    return scores, maps


def _round_robin(batches: list[list[int]], ctx: DistContext) -> tuple[list[list[int]], int]:
    """This rank's share of ``batches`` and the number of gather rounds."""
    return batches[ctx.rank::ctx.world_size], math.ceil(len(batches) / ctx.world_size)


def _num_workers(opts: EvalOptions, ctx: DistContext) -> int:
    """Loader processes per rank: given, else up to 8 on a GPU and 1 on the CPU, leaving a core per rank."""
    if opts.num_workers is not None:
        return opts.num_workers
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    spare = (os.cpu_count() or 1) // local - 1
    return max(0, min(8 if ctx.device.type == "cuda" else 1, spare))


def _loader(dataset: CraneDataset, batches: list[list[int]], opts: EvalOptions, ctx: DistContext):
    """One iterator over all of this rank's batches of the run: worker processes decode the next
    batches while the current one runs; pinned memory for non-blocking copies to the GPU."""
    workers = _num_workers(opts, ctx)
    return iter(DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                           pin_memory=ctx.device.type == "cuda", prefetch_factor=2 if workers else None,
                           persistent_workers=False))


def _predict_batches(detector, dataset: CraneDataset, batches: list[list[int]], ctx: DistContext, opts: EvalOptions,
                     sink: Optional[Callable[[dict], None]], desc: str, total: int, loader=None,
                     timer: Optional[StageTimer] = None) -> None:
    """Predict ``batches`` (lists of indices into ``dataset``, each run as one forward pass) across all
    ranks; rank 0's ``sink`` receives every batch as ``{"index", "score", "map", "mask"}`` (dataset
    indices, ``B``, ``B x S x S`` float32, ``B x S x S`` uint8; numpy), in order. ``total``: images
    the progress bar counts. ``loader``: an iterator yielding this rank's share of ``batches`` in
    order (:func:`_loader`; made here when not given)."""
    mine, rounds = _round_robin(batches, ctx)
    loader = _loader(dataset, mine, opts, ctx) if loader is None else loader
    timer = timer or StageTimer()
    token_type = opts.train_with_img_cls_type if opts.train_with_img_cls_prob == 1 and \
        opts.train_with_img_cls_type != "none" else None
    capacity = max(len(b) for b in batches) if batches else 0
    bar = progress(total=total, desc=desc, unit="img", enabled=ctx.is_main)
    for r in range(rounds):
        payload = None
        if r < len(mine):
            with timer("decode"):
                batch = next(loader)
            scores, maps = predict_batch(detector, batch["img"], token_type, timer)
            payload = {"index": mine[r], "score": scores, "map": maps, "mask": batch["img_mask"].to(torch.uint8)}
        with timer("gather"):
            gathered = gather_batches(payload, capacity, opts.image_size, ctx)
        if ctx.is_main:
            for part in gathered:
                with timer("files"):
                    sink(part)
                timer.images += len(part["index"])
                bar.update(len(part["index"]))
    bar.close()


# ---------------------------------------------------------------------------- metrics


def class_metrics(labels: np.ndarray, scores: np.ndarray, masks: Optional[np.ndarray], maps: Optional[np.ndarray],
                  aupro_method: str = "crane") -> dict[str, Optional[float]]:
    """The six metrics of one class; ``None`` where undefined. No progress display: it runs in the
    background while the next class predicts, and the prediction bar is the process's one display.

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
    for name, job in jobs.items():
        out[name] = results.defined(job())
    return out


class _ClassCollector:
    """Rank 0's view of one class while its batches arrive: scores, the maps and masks that
    the pixel metrics need, and (optionally) every map for saving or panels."""

    def __init__(self, samples: list[dict], indices: list[int], size: int, maps_dir: Optional[Path],
                 keep_all_maps: bool, as_published: bool = False) -> None:
        self.samples, self.maps_dir, self.as_published = samples, maps_dir, as_published
        self.position = {index: i for i, index in enumerate(indices)}
        n = len(samples)
        has_mask = np.array([bool(s["mask_path"]) for s in samples])
        labels = np.array([int(s["anomaly"]) for s in samples])
        self.labels = labels
        if as_published:  # every image, an anomalous one without a mask file counting as all normal pixels
            self.pixel = np.ones(n, bool)
        else:
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
                results.save_npy(self.maps_dir / f"{self.samples[i]['img_path']}.npy", part["map"][j])

    def metrics(self, aupro_method: str) -> dict[str, Optional[float]]:
        """The class's metrics; undefined ones are ``None``, or 0 as the published test.py reports them."""
        with_pixels = bool(self.pixel.any())
        values = class_metrics(self.labels, self.scores, self.masks if with_pixels else None,
                               self.pixel_maps if with_pixels else None, aupro_method)
        return {k: (0.0 if v is None else v) for k, v in values.items()} if self.as_published else values

    def predictions(self) -> list[dict[str, Any]]:
        return [{"img_path": s["img_path"], "cls_name": s["cls_name"], "specie_name": s["specie_name"],
                 "anomaly": int(s["anomaly"]), "score": float(score)} for s, score in zip(self.samples, self.scores)]


def _visualize_class(collector: _ClassCollector, root: Path, out_dir: Path) -> None:
    """One panel per image (original | heat map | overlay) into ``out_dir/<folder>_<NAME>.png``, NAME the
    file name as predict names outputs (:func:`crane.data.folders.output_name`: ``good/004.png`` ->
    ``good_004.png``, ``Normal/0001.JPG`` -> ``Normal_0001.JPG.png``).

    The predicted region is outlined at the class's pixel F1-max threshold (the operating
    point of the ``pixel_f1`` metric), the ground truth in green; no outline without masks.
    """
    from crane.data.folders import output_name
    from crane.inspection.thresholds import max_f1_threshold
    from crane.inspection.visualize import save_panel

    masks = collector.masks
    threshold = max_f1_threshold(masks, collector.pixel_maps)[0] if masks.any() and not masks.all() else None
    for i, sample in enumerate(collector.samples):  # in the background: no progress display of its own
        gt = masks[collector.slot[i]] if sample["mask_path"] and collector.pixel[i] else None
        path = Path(sample["img_path"])
        save_panel(out_dir / f"{path.parent.name}_{output_name(Path(path.name))}.png", load_rgb(root / path),
                   collector.all_maps[i], threshold=threshold, gt_mask=gt, score=float(collector.scores[i]),
                   caption=sample["img_path"])


# ------------------------------------------------------------------------------- run


class _Schedule:
    """Which batches each pending class computes (published batching: a batch shared by two
    pending classes is computed once, for the first, and its outputs kept on rank 0 for the
    next), decided identically on every rank before the run."""

    def __init__(self, plan: EvalPlan, dataset: CraneDataset) -> None:
        share = not plan.references  # few-shot: each class scores with its own memory, so computes its own batches
        done: set[tuple[int, ...]] = set()
        self.todo: dict[str, list[list[int]]] = {}
        for cls_name in plan.pending:
            self.todo[cls_name] = [b for b in plan.batches[cls_name] if tuple(b) not in done]
            if share:
                done.update(tuple(b) for b in self.todo[cls_name])
        self.later = {c: {i for i, s in enumerate(dataset.samples) if share and s["cls_name"] in plan.pending[k + 1:]}
                      for k, c in enumerate(plan.pending)}
        self.kept: dict[tuple[int, ...], dict] = {}

    def rank_batches(self, ctx: DistContext) -> list[list[int]]:
        """This rank's batches of the whole run, in the order it computes them."""
        return [b for todo in self.todo.values() for b in _round_robin(todo, ctx)[0]]

    def take_kept(self, plan: EvalPlan, cls_name: str) -> list[dict]:
        """The kept outputs of ``cls_name``'s batches computed for an earlier class; a batch is
        dropped once no later pending class has an image in it (a batch may span several classes)."""
        parts = []
        for batch in plan.batches[cls_name]:
            key = tuple(batch)
            if key in self.kept:
                parts.append(self.kept[key])
                if not self.later[cls_name].intersection(batch):
                    del self.kept[key]
        return parts

    def keep(self, cls_name: str, part: dict) -> None:
        if self.later[cls_name].intersection(part["index"]):
            self.kept[tuple(part["index"])] = part


def _predict_class(cls_name: str, position: str, detector, dataset: CraneDataset, plan: EvalPlan,
                   opts: EvalOptions, ctx: DistContext, schedule: _Schedule, loader, timer: StageTimer
                   ) -> Optional[_ClassCollector]:
    """Predict one class (its scheduled batches); rank 0 returns the filled collector."""
    indices = [i for i, s in enumerate(dataset.samples) if s["cls_name"] == cls_name]
    todo = schedule.todo[cls_name]
    if plan.references:  # every rank builds the class's memory from the same drawn images
        detector.set_reference([plan.root / path for path, _ in plan.references[cls_name]], opts.coreset_ratio,
                               opts.few_shot_weight)
    collector = None
    if ctx.is_main:
        samples = [dataset.samples[i] for i in indices]
        collector = _ClassCollector(samples, indices, opts.image_size,
                                    plan.save_path / "maps" if opts.save_maps else None, opts.visualize,
                                    opts.metrics_as_published)
        for part in schedule.take_kept(plan, cls_name):
            collector.add(part)

    def sink(part: dict) -> None:
        schedule.keep(cls_name, part)
        collector.add(part)

    _predict_batches(detector, dataset, todo, ctx, opts, sink if collector else None, f"{cls_name} {position}",
                     total=sum(len(b) for b in todo), loader=loader, timer=timer)
    return collector


def _finish_class(cls_name: str, collector: _ClassCollector, dataset: CraneDataset, plan: EvalPlan,
                  opts: EvalOptions, timer: StageTimer) -> None:
    """Rank 0: the class's metrics, panels and record (run in the background while the next class predicts)."""
    with timer("metrics"):
        values = collector.metrics(opts.aupro_method)
    with timer("files"):
        if opts.visualize:
            _visualize_class(collector, plan.root, plan.save_path / "visualization" / cls_name)
        record = {"settings": plan.settings, "metrics": values, "predictions": collector.predictions(),
                  "inputs": plan.inputs[cls_name], "batches": _batch_paths(dataset, plan.batches[cls_name], opts),
                  "maps_saved": opts.save_maps, "visualized": opts.visualize}
        if plan.references:
            record["references"] = plan.references[cls_name]
        results.write_json(_class_file(plan.save_path, cls_name), record)


def summarize(plan: EvalPlan) -> str:
    """Assemble ``metrics.json``, ``metrics.md`` and ``predictions.csv`` from the class records;
    return the Markdown table."""
    records = {c: results.read_json(_class_file(plan.save_path, c)) for c in plan.classes}
    per_class = {c: records[c]["metrics"] for c in plan.classes}
    mean = {m: results.mean_defined(v[m] for v in per_class.values()) for m in results.METRICS}
    content = {"classes": per_class, "mean": mean, "args": plan.settings, "run": plan.run}
    if plan.references:  # the reference images each class was scored with (paths relative to the dataset)
        content["references"] = {c: [path for path, _ in records[c]["references"]] for c in plan.classes}
    results.write_json(plan.save_path / "metrics.json", content)
    rows = [dict(p, score=str(np.float32(p["score"]))) for c in plan.classes for p in records[c]["predictions"]]
    results.write_csv(plan.save_path / "predictions.csv", results.PREDICTION_COLUMNS, rows)
    table = results.metrics_table(per_class, mean)
    banner = settings.random_weights_banner(plan.settings)
    shots = f", {plan.settings['few_shot']}-shot, seed {plan.settings['few_shot_seed']}" if plan.references else ""
    results.write_text(plan.save_path / "metrics.md", (f"> {banner}\n\n" if banner else "")
                       + f"# {plan.settings['dataset']} ({plan.run['run_name']}, "
                       f"AUPRO: {plan.settings['aupro_method']}{shots})\n\n{table}\n")
    return f"{banner}\n{table}" if banner else table


def _plan_on_main(opts: EvalOptions, ctx: DistContext) -> EvalPlan:
    """Rank 0 prepares the plan; every rank gets it, or the same error."""
    plan, error = None, None
    if ctx.is_main:
        try:
            plan = prepare(opts)
        except CraneError as e:
            error = str(e)
    plan, error = broadcast_from_main((plan, error), ctx)
    if error:
        raise EvalError(error)
    return plan


def _set_cpu_threads(ctx: DistContext) -> None:
    if ctx.device.type == "cpu" and ctx.distributed and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def join(opts: EvalOptions) -> DistContext:
    """This process's place in the evaluation (joining the process group when there are several), with its
    CPU threads shared fairly among the processes of the machine."""
    torch_launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    devices = list(opts.devices) if opts.devices else None
    ctx = init_distributed(opts.device, devices if not torch_launched or (devices and len(devices) > 1) else None)
    _set_cpu_threads(ctx)
    return ctx


def rank_loader(plan: EvalPlan, ctx: DistContext) -> DataLoader:
    """The loader of this rank's batches of ``plan``: preprocessed images and masks, in the order
    :func:`worker` predicts them (for measuring decoding alone)."""
    dataset = _dataset(plan.opts, plan.root, validate=False)
    return _loader(dataset, _Schedule(plan, dataset).rank_batches(ctx), plan.opts, ctx)


def worker(opts: EvalOptions, plan: Optional[EvalPlan] = None,
           build: Callable[[EvalOptions, dict], Any] = build_detector) -> Path:
    """One process of an evaluation (the only one, or one rank of many). ``build(options, checkpoint_state)``
    makes the detector (:func:`crane.detector.build_detector`; benchmarks pass their own). Returns the run's
    results folder."""
    setup_logging()  # a spawned process starts without the parent's logging configuration
    ctx = join(opts)
    if plan is None:
        plan = _plan_on_main(opts, ctx)
    opts = plan.opts
    if ctx.is_main:
        done = len(plan.classes) - len(plan.pending)
        if done:
            log.warning("resuming in %s: %d of %d classes already finished with these settings",
                        plan.save_path, done, len(plan.classes))
    timer = StageTimer(enabled=opts.profile is not None, device=ctx.device)
    if plan.pending:
        torch.manual_seed(opts.seed)
        detector = build(dataclasses.replace(opts, device=ctx.device), plan.checkpoint_state)
        timer.restart()  # stages and images/s count from here: building the model is not throughput
        dataset = _dataset(opts, plan.root, validate=False)
        schedule = _Schedule(plan, dataset)
        loader = _loader(dataset, schedule.rank_batches(ctx), opts, ctx)
        # Metrics of a class run on rank 0 in one background thread while the next class predicts;
        # classes finish in order, and an error in one stops the run.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crane-metrics") as background:
            finishing = []
            try:
                for k, cls_name in enumerate(plan.pending):
                    collector = _predict_class(cls_name, f"[{k + 1}/{len(plan.pending)}]", detector, dataset, plan,
                                               opts, ctx, schedule, loader, timer)
                    for future in finishing:
                        if future.done():
                            future.result()  # an error of a finished class stops the run now
                    if collector is not None:
                        finishing.append(background.submit(_finish_class, cls_name, collector, dataset, plan,
                                                           opts, timer))
                left = sum(not future.done() for future in finishing)
                if left:
                    log.info("finishing the metrics%s of the last %d class(es) ...",
                             " and panels" if opts.visualize else "", left)
                for future in finishing:
                    future.result()
            except BaseException:
                for future in finishing:  # classes not started are not finished after an error or Ctrl-C
                    future.cancel()
                raise
    barrier(ctx)
    if ctx.is_main:
        print(summarize(plan), flush=True)
        print(f"results in {plan.save_path}", flush=True)
        if opts.profile is not None:
            timer.write(Path(opts.profile))
            log.info("stage timings in %s", opts.profile)
    return plan.save_path


def evaluate(opts: EvalOptions) -> Path:
    """Run the evaluation described by ``opts``; return the folder holding the results.

    With several ``devices`` (and not already under ``torchrun``) one process per device
    is spawned. Raises ``EvalError``, ``DatasetError``, ``WeightsNotFoundError`` or
    ``CheckpointMismatchError`` with a one-line message for unusable input.

    Few-shot (``few_shot`` > 0): one run per seed of :func:`few_shot_seeds`, each in its own folder
    (:func:`run_folder`), then the summary over the seeds beside them
    (:func:`crane.engine.few_shot.summarize_seeds`); returns the folder holding them.
    """
    if opts.few_shot <= 0:
        return _evaluate_run(opts)
    seeds = few_shot_seeds(opts)
    folders = [_evaluate_run(dataclasses.replace(opts, few_shot_seeds=[seed])) for seed in seeds]
    base = folders[0].parent
    if int(os.environ.get("RANK", "0")) == 0:
        table = summarize_seeds(base, seeds, opts.few_shot)
        print(f"{opts.few_shot}-shot over seeds {' '.join(map(str, seeds))} (mean ± sample std):\n{table}\n"
              f"summary in {base}", flush=True)
    return base


def _evaluate_run(opts: EvalOptions) -> Path:
    """One evaluation (one seed of a few-shot protocol); returns its results folder."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        try:
            return worker(opts)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    plan = prepare(opts)
    launch(worker, len(plan.opts.devices), plan.opts, plan)
    return plan.save_path
