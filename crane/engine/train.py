"""Prompt-learner training (docs/method.md §6), the engine behind ``train.py``.

One process follows the published ``train.py`` step for step, so that the same data,
flags and ``--seed`` end with the published checkpoints (to float tolerance):

* the training set is the ``test`` split of every ``--dataset``, classes merged by name,
  with the published ``--k_shot`` / ``--portion`` picks (:func:`crane.data.dataset.training_order`);
* the initial prompts are the published ones: the global torch generator is seeded with
  ``--seed`` and advanced as the published model construction advances it
  (:mod:`crane.engine.published_init`) before the prompts are drawn;
* each epoch's order is the published loader's: one ``RandomSampler`` generator seeded
  with ``--seed`` for the whole run (every epoch also draws a worker seed from it);
* ``--aug_rate`` mosaics take their draws where the published loader's workers do: each of
  its 16 workers, re-seeded with ``111 + worker`` (whatever ``--seed``) every epoch, loads
  batches ``worker, worker + 16, ...``;
* with ``--train_with_img_cls_prob`` below 1, each step draws ``torch.rand(1)`` from the
  global generator to choose image-conditioned prompts (``u <= p``), as published;
* deterministic algorithms are switched on for the run (``warn_only``), as published.

The published loop encodes every image in every epoch; here each training image is
encoded once (:mod:`crane.engine.feature_cache`) and later epochs run from the cache
(mosaics are encoded as they come). The arithmetic per step is the published one.

Several processes (``devices`` with more than one entry, or ``torchrun``): DDP over the
prompt learner, data dealt with ``DistributedSampler`` (a different order from the
published one, the same for any run of that size); ``batch_size`` is per process. The
loss terms are means over pixels and images, so K processes with batch ``b`` take the
steps of one process with batch ``K*b`` in that order (except with ``dattn_batch_mean``,
whose D-Attn mean is per process batch).

Run layout: ``SAVE_PATH/trained_on_{datasets joined by _}_{MODEL_NAME}/`` holds
``epoch_{k}.pth`` (official format, plus the ``"crane"`` settings entry), ``args.json``,
``log.csv`` (one row per epoch), ``train.log`` and ``last.pt`` (model, optimizer and RNG
state after the last complete epoch, for ``resume``). The folder appears when the first
epoch completes; every file is written atomically with the process umask.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, DistributedSampler, Subset

from crane import settings
from crane.checkpoints import OFFICIAL, metadata_entry, read_checkpoint, sha256_file
from crane.data.dataset import CraneDataset, training_order
from crane.data.image import load_mask, preprocess
from crane.data.meta import default_datasets_root
from crane.device import precision_error
from crane.device import resolve_device as resolve_device_value
from crane.engine.augment import draw_mosaic, mosaic
from crane.engine.distributed import DistContext, barrier, broadcast_from_main, init_distributed, launch
from crane.engine.feature_cache import Entry, FeatureCache, FrozenImageEncoder, options_key
from crane.engine.published_init import ClipShapes, replay_published_draws
from crane.engine.results import fixed
from crane.files import file_identity, output_problem, save_torch, write_text
from crane.logs import progress, setup_logging
from crane.losses import crane_loss
from crane.models.build import build_model
from crane.models.crane import CraneConfig, CraneModel
from crane.models.errors import ModelSettingsError
from crane.models.weights import clip_depth, weights_file, weights_problems
from crane.models.prompts import save_prompt_checkpoint
from crane.settings import PRECISIONS
from crane.errors import CraneError

log = logging.getLogger(__name__)

INTERPOLATIONS = ("nearest", "bilinear")
FEATURE_CACHES = ("memory", "disk", "off")
ADAM_BETAS = (0.6, 0.999)
STATE_FILE = "last.pt"
RUN_FILES = ("args.json", "log.csv", "train.log", STATE_FILE)
EPOCH_FILE = re.compile(r"epoch_(\d+)\.pth$")
LOG_FIELDS = ("epoch", "loss", "focal_x2", "dice_x2", "image_ce", "images", "seconds", "encode_seconds")
"""``log.csv`` columns: ``loss = focal_x2 + dice_x2 + 0.2 * image_ce`` (focal and dice summed over the
token sets and weighted by 2, as the published log prints them; the image cross-entropy unweighted)."""
PUBLISHED_WORKERS = 16
"""Worker processes of the published training DataLoader (``num_workers=16``)."""
PUBLISHED_WORKER_SEED = 111
"""Published quirk: ``seed_worker`` seeds each worker's ``random`` with ``111 + worker id``, not ``--seed``."""
CACHE_FORMAT = 3
"""Version of the disk cache's key: 3 keys files by content (2 by size and modification time)."""
DISK_CACHE_FOLDER = ".feature_cache"
"""``--feature_cache disk`` keeps entries under ``SAVE_PATH/.feature_cache/KEY`` (shared by the runs of a save
path; KEY covers the weights and options, each entry's name the image and mask files)."""
NO_EFFECT_FLAGS = {"why": "a note for the run's records", "train_data_path": "replaced by DATASETS_ROOT_DIR/DATASET"}
"""Published flags that change nothing here (as in the published script); said once when given."""


class TrainError(CraneError):
    """A training setting is unusable (bad option, missing file, resume that does not fit)."""


@dataclass
class TrainRun:
    """Everything ``train.py`` accepts besides the model settings, named as its flags."""

    dataset: Sequence[str] = ("mvtec",)
    datasets_root_dir: str = field(default_factory=default_datasets_root)
    model_name: str = "default"
    save_path: str = "./checkpoints/"
    seed: int = 111
    save_freq: int = 1
    epoch: int = 5
    learning_rate: float = 1e-3
    batch_size: int = 8
    aug_rate: float = 0.0
    k_shot: int = 0
    portion: float = 1.0
    interpolation: str = "nearest"
    device: str = "auto"
    devices: Optional[Sequence[int]] = None
    init_checkpoint: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    feature_cache: str = "memory"
    num_workers: Optional[int] = None
    precision: str = "fp32"
    compile: bool = False
    type: str = "train"
    why: Optional[str] = None
    train_data_path: Optional[Sequence[str]] = None


TrainOptions = settings.with_settings(TrainRun, "train", "TrainOptions")
"""Everything ``train.py`` accepts, named as its flags (see ``python train.py --help``): :class:`TrainRun` and
the model settings of the ``train`` context (:data:`crane.settings.SETTINGS`)."""


def run_dir(opts: TrainOptions) -> Path:
    """``SAVE_PATH/trained_on_{datasets joined by _}_{MODEL_NAME}``."""
    return Path(opts.save_path) / f"trained_on_{'_'.join(opts.dataset)}_{opts.model_name}"


def result_settings(opts: TrainOptions, world_size: int) -> dict[str, Any]:
    """The options that determine the trained prompts (a resumed run must match them).

    Not included: where files go, how many epochs (a run may be extended), how often
    checkpoints are kept, the cache mode, the data-loading workers, the devices and ``compile``.
    The image side's ``precision`` is included (bf16 / fp16 change the features).
    """
    keep = ("seed", "learning_rate", "batch_size", "aug_rate", "k_shot", "portion", "interpolation",
            "init_checkpoint", "type", "precision")
    return {"dataset": list(opts.dataset), **{k: getattr(opts, k) for k in keep},
            **settings.recorded(opts, "train"), "world_size": world_size}


def resolve_device(opts: TrainOptions) -> tuple[str, list[int]]:
    """``--device`` / ``--devices`` -> (``"cpu"`` or ``"cuda"``, one index per process); a bare ``N``
    without a GPU trains on the CPU with a warning, as the published train.py does."""
    try:
        kind, devices = resolve_device_value(opts.device, opts.devices, index_falls_back_to_cpu=True)
    except CraneError as e:
        raise TrainError(str(e)) from None
    if kind == "cpu" and str(opts.device).strip().isdigit():
        log.warning("--device %s: no GPU here, training on the CPU (as the published train.py does)", opts.device)
    return kind, devices


def _check_options(opts: TrainOptions) -> None:
    """Reject unusable options before any model work: every problem, in one :class:`TrainError`."""
    checks = [
        (not opts.dataset, "--dataset needs at least one dataset key"),
        (opts.epoch < 1, f"--epoch must be >= 1, got {opts.epoch}"),
        (opts.batch_size < 1, f"--batch_size must be >= 1, got {opts.batch_size}"),
        (opts.save_freq < 1, f"--save_freq must be >= 1, got {opts.save_freq}"),
        (opts.learning_rate <= 0, f"--learning_rate must be > 0, got {opts.learning_rate}"),
        (not 0.0 <= opts.aug_rate <= 1.0, f"--aug_rate must be in [0, 1], got {opts.aug_rate}"),
        (opts.k_shot < 0, f"--k_shot must be >= 0, got {opts.k_shot}"),
        (not 0.0 < opts.portion <= 1.0, f"--portion must be in (0, 1], got {opts.portion}"),
        (opts.interpolation not in INTERPOLATIONS, f"--interpolation must be one of {', '.join(INTERPOLATIONS)}"),
        (opts.feature_cache not in FEATURE_CACHES, f"--feature_cache must be one of {', '.join(FEATURE_CACHES)}"),
        (opts.precision not in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {opts.precision!r}"),
        (opts.resume and opts.overwrite, "--resume and --overwrite exclude each other: continue the run or replace it"),
        (opts.init_checkpoint is not None and not Path(opts.init_checkpoint).expanduser().is_file(),
         f"--init_checkpoint file not found: {opts.init_checkpoint}"),
    ]
    problems = [message for bad, message in checks if bad] + settings.problems(opts, "train")
    problems += [p for p in [output_problem(run_dir(opts), folder=True, flag="--save_path")] if p]
    weights = weights_problems(opts.clip_weights, opts.dino_model, opts.dino_weights, opts.clip_model, caches=False)
    if not problems and not weights:
        problems += settings.layer_problems(opts.features_list, clip_depth(str(opts.clip_weights), opts.clip_model),
                                            f"{opts.clip_model} {opts.clip_weights}")
    problems += weights
    if problems:
        raise TrainError("; ".join(problems))


# ------------------------------------------------------------------------------ data


@dataclass
class TrainingSet:
    """The published training set: the ``test`` split of every ``--dataset``, in the published order."""

    dataset: Subset  # items by training index
    roots: list[Path]
    samples: list[tuple[int, dict[str, Any]]]  # (dataset number, meta.json sample) per training index
    keys: list[str]  # cache key of each sample: image and mask file identities
    labels: list[int]
    pools: dict[str, dict[str, list[int]]]  # class -> "normal"/"abnormal" -> training indices (mosaic tiles)

    def __len__(self) -> int:
        return len(self.samples)


def load_training_set(opts: TrainOptions) -> TrainingSet:
    """Read and validate every ``DATASETS_ROOT_DIR/DATASET/meta.json`` (``test`` split); ``DatasetError`` if unusable.

    ``--k_shot`` / ``--portion`` select samples as the published training does (only with ``--type train``).
    """
    parts = [CraneDataset(Path(opts.datasets_root_dir) / name, split="test", image_size=opts.image_size)
             for name in opts.dataset]
    roots = [part.root for part in parts]
    sampled = opts.type == "train"
    order = training_order(parts, opts.k_shot if sampled else 0, opts.portion if sampled else 1.0, opts.seed)
    if not order:
        raise TrainError(f"--k_shot {opts.k_shot} / --portion {opts.portion} keep no training image (per class "
                         "k_shot // 2 normal and as many anomalous images, else int(n * portion) of each kind)")
    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
    dataset = Subset(ConcatDataset(parts), [int(offsets[n]) + i for n, i in order])
    samples = [(n, parts[n].samples[i]) for n, i in order]
    keys, labels, pools = [], [], {}
    for index, (number, s) in enumerate(samples):
        mask = roots[number] / s["mask_path"] if s["mask_path"] else None
        keys.append(f"{file_identity(roots[number] / s['img_path'])}|{file_identity(mask)}")
        labels.append(int(s["anomaly"]))
        status = "abnormal" if s["anomaly"] else "normal"
        pools.setdefault(s["cls_name"], {"normal": [], "abnormal": []})[status].append(index)
    return TrainingSet(dataset, roots, samples, keys, labels, pools)


@dataclass
class EpochPlan:
    """What one epoch does on this rank: its batches of training indices and, per batch
    position, the four tile indices of a mosaic (``None``: the sample itself)."""

    batches: list[list[int]]
    mosaics: list[list[Optional[list[int]]]]


def epoch_plans(data: TrainingSet, opts: TrainOptions, ctx: DistContext) -> Iterator[EpochPlan]:
    """The plans of epochs 1, 2, ... (see the module docstring for the published order and draws)."""
    published = not ctx.distributed
    sampler_generator = torch.Generator()
    sampler_generator.manual_seed(opts.seed)
    augment = opts.type == "train" and opts.aug_rate > 0
    epoch = 0
    while True:
        epoch += 1
        if published:  # the published DataLoader(shuffle=True, generator=g): a worker seed, then the sampler
            loader = DataLoader(range(len(data)), batch_size=opts.batch_size, shuffle=True, generator=sampler_generator)
            batches = [b.tolist() for b in loader]
        else:
            sampler = DistributedSampler(range(len(data)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                         seed=opts.seed, drop_last=False)
            sampler.set_epoch(epoch)
            batches = list(BatchSampler(sampler, opts.batch_size, drop_last=False))
        first_worker_seed = PUBLISHED_WORKER_SEED + (0 if published else PUBLISHED_WORKERS * ctx.rank)
        workers = [random.Random(first_worker_seed + w) for w in range(PUBLISHED_WORKERS)]
        mosaics = []
        for number, batch in enumerate(batches):
            rng = workers[number % PUBLISHED_WORKERS]
            mosaics.append([draw_mosaic(rng, data.samples[i][1]["cls_name"], data.pools[data.samples[i][1]["cls_name"]],
                                        opts.aug_rate) if augment else None for i in batch])
        yield EpochPlan(batches, mosaics)


def _mosaic_item(data: TrainingSet, sources: Sequence[int], size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Preprocessed mosaic image ``3 x S x S``, its mask ``S x S`` and its label."""
    images, masks = [], []
    for index in sources:
        number, s = data.samples[index]
        images.append(data.roots[number] / s["img_path"])
        masks.append(data.roots[number] / s["mask_path"] if s["anomaly"] and s["mask_path"] else None)
    image, mask, anomalous = mosaic(images, masks)
    return preprocess(image, size), load_mask(mask, size), int(anomalous)


# ----------------------------------------------------------------------------- model


class PromptTextEncoder(nn.Module):
    """The trainable part as one module (what DDP wraps): prompt learner -> normalised text features.

    The frozen CLIP model is held outside the module tree, so DDP syncs only the prompt learner.
    """

    def __init__(self, model: CraneModel, image_token_type: str) -> None:
        super().__init__()
        self.prompt_learner = model.prompt_learner
        self.image_token_type = image_token_type
        self._frozen = [model]

    def forward(self, image_embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``B x E`` normalised image embeddings (or ``None``) -> ``B x 2 x E`` (or ``1 x 2 x E``)."""
        return self._frozen[0].text_features(image_embedding, self.image_token_type, published_rounding=False)


def _needs_published_draws(opts: TrainOptions) -> bool:
    """The global generator matters for the initial prompts, and for the per-step prompt draws."""
    return opts.init_checkpoint is None or opts.train_with_img_cls_prob != 1


def build_training_model(opts: TrainOptions, init_state: Optional[Mapping[str, Any]] = None) -> CraneModel:
    """Frozen CLIP (+ VFM) with a prompt learner holding the published initial prompts of ``seed`` (or
    ``init_checkpoint``: its state dict ``init_state`` as :func:`train` read it, else read here); the global
    torch generator is left where the published one is."""
    config = CraneConfig.from_options(opts)
    try:
        model = build_model(opts.clip_weights, None, opts.dino_weights, config)
    except ModelSettingsError as e:  # blocks outside a weights file's tower (known once it is read)
        raise TrainError(f"--features_list: {e}") from None
    if _needs_published_draws(opts):
        torch.manual_seed(opts.seed)
        if not replay_published_draws(ClipShapes.of(model.clip), opts.dino_model):
            log.warning("--dino_model %s: the published construction of that model is not replayed, so the initial "
                        "prompts differ from the published run's", opts.dino_model)
        model.prompt_learner.reset_parameters()
    if opts.init_checkpoint is not None:
        state = init_state if init_state is not None else read_checkpoint(opts.init_checkpoint)[0]
        model.prompt_learner.load_official(state, source=str(opts.init_checkpoint))
    model.prompt_learner.requires_grad_(True)
    return model


@contextlib.contextmanager
def published_determinism() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` and deterministic cuDNN for the run, as the
    published ``setup_seed`` sets them; the previous settings come back afterwards."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


# ------------------------------------------------------------------------- files


def _save_state(path: Path, epoch: int, learner: nn.Module, optimizer: torch.optim.Optimizer,
                settings: dict[str, Any]) -> None:
    """``last.pt``: everything a resumed run needs after ``epoch`` complete epochs (atomic)."""
    state = {"epoch": epoch, "settings": settings, "prompt_learner": learner.state_dict(),
             "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
    save_torch(state, path)


def _load_state(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Read ``last.pt`` and check that it was made with the same settings."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise TrainError(f"cannot read the training state {path} ({type(e).__name__}); delete it or pass --overwrite "
                         "to start over") from None
    saved = state.get("settings", {}) if isinstance(state, dict) else {}
    differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if differ:
        details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {settings.get(k)!r}" for k in differ)
        raise TrainError(f"--resume: {path} was written with other settings ({details}); use the original flags "
                         "or another --model_name/--save_path")
    return state


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _read_log(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if int(row["epoch"]) <= upto_epoch]
    return [row for row in rows if set(row) == set(LOG_FIELDS)]


def _epoch_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.glob("epoch_*.pth") if EPOCH_FILE.match(p.name)),
                  key=lambda p: int(EPOCH_FILE.match(p.name).group(1)))


def check_run_folder(opts: TrainOptions, world_size: int) -> int:
    """Decide what the run folder allows before any model work; return the epochs already done (resume).

    Never touches a shipped official checkpoint; a folder holding a run needs ``--resume`` (it
    must hold ``last.pt`` with the same settings) or ``--overwrite``.
    """
    folder = run_dir(opts)
    if not folder.is_dir():
        return 0
    epochs = _epoch_files(folder)
    official = [p for p in epochs if sha256_file(p) in OFFICIAL]
    if official:
        raise TrainError(f"{folder} holds the shipped official checkpoint {official[0].name}, which train.py never "
                         "replaces (not even with --overwrite); choose another --model_name or --save_path")
    ours = [p.name for p in epochs] + [name for name in RUN_FILES if (folder / name).is_file()]
    if not ours or opts.overwrite:
        return 0
    state = folder / STATE_FILE
    if not opts.resume:
        raise TrainError(f"{folder} already holds a training run ({', '.join(ours[:3])}{', ...' if len(ours) > 3 else ''}); "
                         "pass --resume to continue it, --overwrite to replace it, or choose a new --model_name")
    if not state.is_file():
        raise TrainError(f"--resume: {folder} has no {STATE_FILE} to continue from (it holds {', '.join(ours[:3])}); "
                         "pass --overwrite to replace that run or choose a new --model_name")
    return int(_load_state(state, result_settings(opts, world_size))["epoch"])


class _RunLog(logging.Handler):
    """``train.log``: records are kept in memory until the run folder exists, then written there."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._pending: list[str] = []
        self._path: Optional[Path] = None

    def open(self, path: Path, append: bool) -> None:
        self._path = path
        with path.open("a" if append else "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in self._pending)
        self._pending = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        if self._path is None:
            self._pending.append(line)
            return
        with self._path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


# ------------------------------------------------------------------------ training


class Trainer:
    """One process's share of a training run (see the module docstring)."""

    def __init__(self, opts: TrainOptions, ctx: DistContext, init_state: Optional[Mapping[str, Any]] = None) -> None:
        self.opts, self.ctx = opts, ctx
        self.dir = run_dir(opts)
        self.settings = result_settings(opts, ctx.world_size)
        self.data = load_training_set(opts)
        self.model = build_training_model(opts, init_state).to(ctx.device)
        self.learner = self.model.prompt_learner
        text = PromptTextEncoder(self.model, opts.train_with_img_cls_type)
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            text = DistributedDataParallel(text, device_ids=ids)
        self.text = text
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=opts.learning_rate, betas=ADAM_BETAS)
        self.encoder = FrozenImageEncoder(self.model, opts.precision, opts.compile)
        self.cache = self._make_cache()
        self.metadata = metadata_entry(settings.recorded(opts, "checkpoint"), {**self.settings, "epochs": opts.epoch})

    def _make_cache(self) -> Optional[FeatureCache]:
        if self.opts.feature_cache == "off":
            return None
        if self.opts.feature_cache == "memory":
            return FeatureCache()
        return FeatureCache(disk_cache_folder(self.opts, self.model.config))

    # -- resume -----------------------------------------------------------------

    def restore(self) -> int:
        """Load ``last.pt`` when resuming; return the number of epochs already done."""
        path = self.dir / STATE_FILE
        if not self.opts.resume or not path.is_file():
            if self.opts.resume:
                log.info("--resume: no %s yet, starting from epoch 1", path)
            return 0
        state = _load_state(path, self.settings)
        self.learner.load_state_dict(state["prompt_learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        log.info("resuming %s after epoch %d", self.dir, state["epoch"])
        return int(state["epoch"])

    # -- features ---------------------------------------------------------------

    def fill_cache(self) -> float:
        """Encode the images the cache lacks (each rank a strided share, then shared); return seconds."""
        if self.cache is None:
            return 0.0
        start = time.perf_counter()
        missing = broadcast_from_main([i for i, k in enumerate(self.data.keys) if k not in self.cache], self.ctx)
        mine = missing[self.ctx.rank::self.ctx.world_size]
        workers = self.opts.num_workers
        if workers is None:
            workers = min(4, (os.cpu_count() or 1) // self.ctx.world_size) if self.ctx.device.type == "cuda" else 0
        # Its own generator: a DataLoader otherwise draws a seed from the global one, which the prompts use.
        loader = DataLoader(Subset(self.data.dataset, mine), batch_size=self.opts.batch_size, num_workers=workers,
                            generator=torch.Generator())
        new: dict[str, Entry] = {}
        bar = progress(total=len(missing), desc="encode images", unit="img", enabled=self.ctx.is_main and bool(missing))
        done = 0
        for batch in loader:
            entries = self.encoder.encode(batch["img"].to(self.ctx.device))
            for j, entry in enumerate(entries):
                index = mine[done + j]
                entry["mask"] = batch["img_mask"][j].bool()
                self.cache.put(self.data.keys[index], entry)
                new[self.data.keys[index]] = entry
            done += len(entries)
            bar.update(len(entries) * self.ctx.world_size)
        bar.close()
        self._share(new)
        return time.perf_counter() - start

    def _share(self, new: dict[str, Entry]) -> None:
        """Make every rank's new entries available to all ranks."""
        if not self.ctx.distributed:
            return
        if self.cache.folder is not None:
            barrier(self.ctx)
            return
        everything: list[Optional[dict[str, Entry]]] = [None] * self.ctx.world_size
        dist.all_gather_object(everything, new)
        for part in everything:
            self.cache.update(part)

    def _entries(self, indices: Sequence[int], mosaics: Sequence[Optional[list[int]]]
                 ) -> tuple[list[Entry], list[int]]:
        """Entries and labels of a batch: cached, or encoded now (mosaics, ``feature_cache off``)."""
        entries: list[Optional[Entry]] = [None] * len(indices)
        labels = [self.data.labels[i] for i in indices]
        fresh, images, masks = [], [], []
        for j, (i, sources) in enumerate(zip(indices, mosaics)):
            if sources is not None:
                image, mask, labels[j] = _mosaic_item(self.data, sources, self.opts.image_size)
            elif self.cache is not None:
                entries[j] = self.cache.get(self.data.keys[i])
                continue
            else:
                item = self.data.dataset[i]
                image, mask = item["img"], item["img_mask"]
            fresh.append(j)
            images.append(image)
            masks.append(mask)
        if fresh:
            for j, entry, mask in zip(fresh, self.encoder.encode(torch.stack(images).to(self.ctx.device)), masks):
                entry["mask"] = mask.bool()
                entries[j] = entry
        return entries, labels

    # -- steps ------------------------------------------------------------------

    def conditioned(self) -> bool:
        """Image-conditioned prompts for this step? As published: with ``train_with_img_cls_prob`` ``p`` below 1,
        ``torch.rand(1) <= p`` from the global generator, every step; ``none`` never inserts the image token."""
        p = self.opts.train_with_img_cls_prob
        chosen = True if p == 1 else bool(torch.rand(1).item() <= p)
        return chosen and self.opts.train_with_img_cls_type != "none"

    def step(self, entries: Sequence[Entry], labels: Sequence[int], conditioned: bool) -> torch.Tensor:
        """One optimisation step on a batch; returns the detached ``[total, focal x2, dice x2, image ce]``."""
        device = self.ctx.device
        feats = self.encoder.assemble(entries, device)
        masks = torch.stack([e["mask"] for e in entries]).to(device=device, dtype=torch.float32)
        text = self.text(feats.image_embedding if conditioned else None)
        logits = self.model.patch_logits(feats, text)
        terms = crane_loss(feats.patch_tokens, logits, feats.image_embedding, text, masks,
                           torch.tensor(labels, device=device), self.opts.interpolation,
                           self.opts.use_scorebase_pooling, dice_rows_of_single_image=not self.ctx.distributed)
        self._check_finite(terms.total, feats.patch_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        self.optimizer.step()
        return torch.stack([t.detach() for t in (terms.total, terms.focal, terms.dice, terms.ce)]).cpu()

    def _check_finite(self, loss: torch.Tensor, token_sets: Sequence[torch.Tensor]) -> None:
        """Stop (on every rank) before a non-finite loss reaches the prompts."""
        finite = torch.isfinite(loss.detach()).float()
        if self.ctx.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 1.0:
            return
        bad = [i for i, t in enumerate(token_sets) if not torch.isfinite(t).all()]
        hint = (f"token set(s) {bad} of the image features hold NaN/inf"
                + ("; with D-Attn this happens when the VFM's patch features are nearly identical (mean "
                   "similarity above 1/1.2, so every attention entry is masked): check --dino_weights"
                   if self.model.vfm is not None else "")) if bad else "the image features are finite"
        raise TrainError(f"non-finite training loss; {hint}. No checkpoint was written for this epoch.")

    def run_epoch(self, epoch: int, plan: EpochPlan) -> dict[str, float]:
        """Train one epoch; return the mean loss terms over all steps of all ranks."""
        sums = torch.zeros(4, dtype=torch.float64)
        bar = progress(plan.batches, desc=f"epoch {epoch}/{self.opts.epoch}", unit="batch", enabled=self.ctx.is_main)
        for n, (indices, mosaics) in enumerate(zip(bar, plan.mosaics), start=1):
            entries, labels = self._entries(indices, mosaics)
            sums += self.step(entries, labels, self.conditioned()).double()
            bar.set_postfix(loss=f"{sums[0].item() / n:.4f}")
        bar.close()
        counts = torch.tensor([float(len(plan.batches)), float(sum(len(b) for b in plan.batches))], dtype=torch.float64)
        if self.ctx.distributed:
            both = torch.cat([sums, counts])
            dist.all_reduce(both)
            sums, counts = both[:4], both[4:]
        means = (sums / counts[0].clamp(min=1)).tolist()
        return {"loss": means[0], "focal_x2": means[1], "dice_x2": means[2], "image_ce": means[3],
                "images": int(counts[1].item())}

    def _open_folder(self, done: int, run_log: Optional[_RunLog]) -> None:
        """Create (or, with ``--overwrite``, clear) the run folder once the first epoch is complete."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.opts.overwrite and done == 0:
            for path in _epoch_files(self.dir) + [self.dir / name for name in RUN_FILES]:
                path.unlink(missing_ok=True)
        args = {**asdict(self.opts), "world_size": self.ctx.world_size, "crane": self.metadata}
        write_text(self.dir / "args.json", json.dumps(args, indent=2, default=list) + "\n")
        if run_log is not None:
            run_log.open(self.dir / "train.log", append=done > 0)

    def _save_checkpoint(self, epoch: int) -> None:
        path = self.dir / f"epoch_{epoch}.pth"
        if path.is_file() and sha256_file(path) in OFFICIAL:  # checked up front too; never replace one
            raise TrainError(f"{path} is a shipped official checkpoint; train.py never replaces it")
        meta = {**self.metadata, "train": {**self.metadata["train"], "epoch": epoch}}
        save_prompt_checkpoint(self.learner, path, extra={"crane": meta})

    def fit(self, run_log: Optional[_RunLog] = None) -> None:
        """Train from the last complete epoch (or 1) to ``epoch``, checkpointing as published."""
        done = self.restore()
        if done >= self.opts.epoch:
            log.info("%s already has %d epochs (asked for %d): nothing to do", self.dir, done, self.opts.epoch)
            return
        rows = _read_log(self.dir / "log.csv", done) if self.ctx.is_main else []
        plans = epoch_plans(self.data, self.opts, self.ctx)
        for _ in range(done):
            next(plans)  # the sampler generator and the worker streams as after those epochs
        encode_seconds = self.fill_cache()
        opened = False
        for epoch in range(done + 1, self.opts.epoch + 1):
            start = time.perf_counter()
            stats = self.run_epoch(epoch, next(plans))
            seconds = time.perf_counter() - start + encode_seconds
            if self.ctx.is_main:
                if not opened:
                    self._open_folder(done, run_log)
                    opened = True
                if epoch % self.opts.save_freq == 0:
                    self._save_checkpoint(epoch)
                rows.append({"epoch": epoch, **{k: fixed(v, 6) for k, v in stats.items() if k != "images"},
                             "images": stats["images"], "seconds": f"{seconds:.3f}",
                             "encode_seconds": f"{encode_seconds:.3f}"})
                _write_log(self.dir / "log.csv", rows)
                _save_state(self.dir / STATE_FILE, epoch, self.learner, self.optimizer, self.settings)
                terms = [fixed(stats[k], 4) for k in ("loss", "focal_x2", "dice_x2", "image_ce")]
                log.info("epoch [%d/%d] loss %s = focal x2 %s + dice x2 %s + 0.2 x image CE %s (%d images, %.1f s, "
                         "encoding %.1f s)", epoch, self.opts.epoch, *terms, stats["images"], seconds, encode_seconds)
            barrier(self.ctx)
            encode_seconds = 0.0


def disk_cache_folder(opts: TrainOptions, config: CraneConfig) -> Path:
    """``SAVE_PATH/.feature_cache/KEY``: KEY hashes the weights' file identities (by content,
    :func:`crane.files.file_identity`), the image-side settings (:mod:`crane.settings`), the precision and the
    model's config; entries inside are named by
    their image's and mask's identities, so changed files or weights are never served from the cache."""
    image_side = {name: value for name, value in settings.recorded(opts, "train").items()
                  if settings.BY_NAME[name].role in ("model", "vfm")}  # what shapes the frozen features
    key = options_key({"format": CACHE_FORMAT, "clip": file_identity_of(weights_file("clip", opts.clip_weights,
                                                                                              opts.clip_model)),
                       "dino": file_identity_of(weights_file(opts.dino_model, opts.dino_weights)),
                       **image_side, "precision": opts.precision, "config": asdict(config)})
    folder = Path(opts.save_path) / DISK_CACHE_FOLDER
    if folder.is_dir() and not (folder / key).is_dir() and any(p.is_dir() for p in folder.iterdir()):
        log.info("%s holds features of other weights or settings, or keyed by an older crane (on size and "
                 "modification time): the features of this run are computed once and kept under %s", folder, key)
    return folder / key


def file_identity_of(weights: Optional[str]) -> Optional[str]:
    """:func:`crane.files.file_identity` of a weights file; a tag (``synthetic``) or ``None`` as it is."""
    return weights if weights in (None, "synthetic") else file_identity(Path(weights).expanduser())


def _worker(opts: TrainOptions, device: str, devices: Sequence[int],
            init_state: Optional[Mapping[str, Any]] = None) -> None:
    setup_logging()  # a spawned process starts without the parent's logging configuration
    ctx = init_distributed(device, devices)
    if ctx.device.type == "cpu" and ctx.distributed:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))
    run_log = _RunLog() if ctx.is_main else None
    if run_log is not None:
        log.addHandler(run_log)
        previous_level = log.level
        log.setLevel(logging.INFO)
    random.seed(opts.seed)  # as the published setup_seed; nothing here draws from these two
    np.random.seed(opts.seed)
    try:
        with published_determinism():
            Trainer(opts, ctx, init_state).fit(run_log)
    finally:
        if run_log is not None:
            log.removeHandler(run_log)
            log.setLevel(previous_level)


def _check_init_checkpoint(opts: TrainOptions) -> dict[str, Any]:
    """Read ``init_checkpoint`` (the run's one read) and load it into a bare prompt learner of the requested shape
    (``CheckpointMismatchError`` if it does not fit); its width is taken from the checkpoint, the CLIP text width
    is checked when the model loads. Returns its state dict (for the training processes)."""
    from crane.models.build import tokenizer
    from crane.models.prompts import PromptLearner, prompt_shape_problem
    from crane.models.weights import text_width_of

    state, info = read_checkpoint(opts.init_checkpoint)
    problem = prompt_shape_problem(state, opts.n_ctx, opts.t_n_ctx, opts.depth,
                                   text_width_of(opts.clip_model, opts.clip_weights), info.settings.get("clip_model"))
    if problem:
        raise TrainError(f"--init_checkpoint {opts.init_checkpoint}: {problem}")
    ctx = state.get("ctx_pos")
    width = ctx.shape[-1] if isinstance(ctx, torch.Tensor) and ctx.ndim else 768
    learner = PromptLearner(nn.Embedding(49408, width), tokenizer(opts.clip_model), opts.n_ctx,
                            opts.t_n_ctx, opts.depth)
    learner.load_official(state, source=str(opts.init_checkpoint))
    return state


def _say_no_effect(opts: TrainOptions) -> None:
    for name, why in NO_EFFECT_FLAGS.items():
        if getattr(opts, name) is not None:
            log.info("--%s has no effect (%s); it is kept in args.json", name, why)
    if opts.type != "train":
        log.info("--type %s: as in the published train.py, --k_shot, --portion and --aug_rate apply only with "
                 "--type train", opts.type)


def train(opts: TrainOptions) -> Path:
    """Check the options, the data and the run folder, then train (one process per device); return the run folder.

    Every unusable input raises a :class:`~crane.errors.CraneError` before any model is built.
    """
    _check_options(opts)
    device, devices = resolve_device(opts)
    problem = precision_error(opts.precision, device)
    if problem:
        raise TrainError(problem)
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if "WORLD_SIZE" in os.environ else len(devices)
    data = load_training_set(opts)
    plans = epoch_plans(data, opts, DistContext(0, world_size))
    for _ in range(opts.epoch if opts.aug_rate > 0 else 0):
        next(plans)  # an empty mosaic pool fails here, before the model loads, as it would fail the published run
    init_state = _check_init_checkpoint(opts) if opts.init_checkpoint is not None else None
    done = check_run_folder(opts, world_size)
    if done >= opts.epoch:
        log.info("%s already has %d epochs (asked for %d): nothing to do", run_dir(opts), done, opts.epoch)
        return run_dir(opts)
    problems = weights_problems(opts.clip_weights, opts.dino_model, opts.dino_weights, opts.clip_model)  # caches
    if problems:
        raise TrainError("; ".join(problems))
    banner = settings.random_weights_banner(opts)
    if banner:
        log.warning("%s", banner)
    _say_no_effect(opts)
    nprocs = len(devices) if "WORLD_SIZE" not in os.environ else 1
    try:
        launch(_worker, nprocs, opts, device, devices, init_state)
    except torch.multiprocessing.ProcessRaisedException as e:  # a spawned process stopped: keep its message
        raise TrainError(f"a training process stopped: {str(e).strip().splitlines()[-1]}") from None
    return run_dir(opts)
