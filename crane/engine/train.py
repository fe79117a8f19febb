"""Prompt-learner training (method.md section 6), the engine behind ``train.py``.

The published loop encodes every image with the frozen CLIP (+ VFM) in every
epoch. Here each training image is encoded once (:mod:`crane.engine.feature_cache`)
and every epoch runs from the cache: an epoch costs the text encoder and the
loss only. Augmented mosaics (``aug_rate``) are new images, so they are encoded
as they come. The arithmetic per step is the published one (checked against the
conformance ``train_step`` outputs).

Run layout: ``SAVE_PATH/trained_on_{datasets joined by _}_{MODEL_NAME}/`` holds
``epoch_{k}.pth`` (official format), ``args.json``, ``log.csv`` (one row per
epoch), ``train.log`` and ``last.pt`` (model, optimizer and RNG state after the
last complete epoch, for ``resume``); every file is written atomically.

Several processes (``devices`` with more than one entry, or ``torchrun``): DDP
over the prompt learner, data dealt with ``DistributedSampler``; ``batch_size``
is per process. The loss terms are means over pixels and images, so K
processes with batch ``b`` take the same steps as one process with batch ``K*b``
(except with ``dattn_batch_mean``, whose D-Attn mean is per process batch).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from crane.cli_args import ATTN_TYPES, DINO_MODELS, IMAGE_TOKEN_TYPES, default_datasets_root
from crane.data.dataset import CraneDataset, DatasetError
from crane.data.image import load_mask, preprocess
from crane.detector import build_model
from crane.engine.augment import mosaic
from crane.engine.distributed import DistContext, barrier, broadcast_from_main, init_distributed, launch
from crane.engine.feature_cache import Entry, FeatureCache, FrozenImageEncoder, file_identity, options_key
from crane.losses import crane_loss
from crane.models.crane import CraneConfig, CraneModel
from crane.models.errors import CheckpointMismatchError, WeightsNotFoundError
from crane.models.prompts import save_prompt_checkpoint

log = logging.getLogger(__name__)

INTERPOLATIONS = ("nearest", "bilinear")
FEATURE_CACHES = ("memory", "disk", "off")
ADAM_BETAS = (0.6, 0.999)
STATE_FILE = "last.pt"
LOG_FIELDS = ("epoch", "loss", "loss_focal", "loss_dice", "loss_ce", "images", "seconds", "encode_seconds")


class TrainError(ValueError):
    """A training setting is unusable (bad option, missing file, resume that does not fit)."""


USER_ERRORS = (TrainError, DatasetError, CheckpointMismatchError, WeightsNotFoundError)


@dataclass
class TrainOptions:
    """Everything ``train.py`` accepts, named as its flags (see ``python train.py --help``)."""

    dataset: Sequence[str] = ("mvtec",)
    datasets_root_dir: str = field(default_factory=default_datasets_root)
    model_name: str = "cranep"
    save_path: str = "./checkpoints"
    seed: int = 111
    save_freq: int = 1
    epoch: int = 5
    learning_rate: float = 1e-3
    batch_size: int = 8
    aug_rate: float = 0.0
    k_shot: int = 0
    portion: float = 1.0
    image_size: int = 518
    features_list: Sequence[int] = (24,)
    interpolation: str = "nearest"
    depth: int = 9
    n_ctx: int = 12
    t_n_ctx: int = 4
    train_with_img_cls_prob: float = 1.0
    train_with_img_cls_type: str = "pad_suffix"
    dino_model: str = "dinov2"
    both_eattn_dattn: bool = True
    use_scorebase_pooling: bool = True
    attn_type: str = "qq+kk+vv"
    dattn_batch_mean: bool = False
    device: str = "cpu"
    devices: Sequence[int] = (0,)
    clip_weights: str = "openai"
    dino_weights: Optional[str] = None
    init_checkpoint: Optional[str] = None
    resume: bool = False
    feature_cache: str = "memory"
    num_workers: Optional[int] = None


def run_dir(opts: TrainOptions) -> Path:
    """``SAVE_PATH/trained_on_{datasets joined by _}_{MODEL_NAME}``."""
    return Path(opts.save_path) / f"trained_on_{'_'.join(opts.dataset)}_{opts.model_name}"


def result_settings(opts: TrainOptions, world_size: int) -> dict[str, Any]:
    """The options that determine the trained prompts (a resumed run must match them).

    Not included: where files go, how many epochs (a run may be extended), how often
    checkpoints are kept, the cache mode and the data-loading workers.
    """
    keep = ("dataset", "seed", "learning_rate", "batch_size", "aug_rate", "k_shot", "portion", "image_size",
            "features_list", "interpolation", "depth", "n_ctx", "t_n_ctx", "train_with_img_cls_prob",
            "train_with_img_cls_type", "dino_model", "both_eattn_dattn", "use_scorebase_pooling", "attn_type",
            "dattn_batch_mean", "clip_weights", "dino_weights", "init_checkpoint")
    settings = {k: getattr(opts, k) for k in keep}
    settings["dataset"] = list(opts.dataset)
    settings["features_list"] = list(opts.features_list)
    settings["world_size"] = world_size
    return settings


def _check_options(opts: TrainOptions) -> None:
    """Reject unusable options with one clear line, before any model work."""
    checks = [
        (not opts.dataset, "--dataset needs at least one dataset key"),
        (opts.epoch < 1, f"--epoch must be >= 1, got {opts.epoch}"),
        (opts.batch_size < 1, f"--batch_size must be >= 1, got {opts.batch_size}"),
        (opts.save_freq < 1, f"--save_freq must be >= 1, got {opts.save_freq}"),
        (opts.learning_rate <= 0, f"--learning_rate must be > 0, got {opts.learning_rate}"),
        (not 0.0 <= opts.aug_rate <= 1.0, f"--aug_rate must be in [0, 1], got {opts.aug_rate}"),
        (not 0.0 <= opts.train_with_img_cls_prob <= 1.0,
         f"--train_with_img_cls_prob must be in [0, 1], got {opts.train_with_img_cls_prob}"),
        (opts.image_size < 14, f"--image_size must be >= 14, got {opts.image_size}"),
        (opts.interpolation not in INTERPOLATIONS, f"--interpolation must be one of {', '.join(INTERPOLATIONS)}"),
        (opts.dino_model not in DINO_MODELS, f"--dino_model must be one of {', '.join(DINO_MODELS)}"),
        (opts.attn_type not in ATTN_TYPES, f"--attn_type must be one of {', '.join(ATTN_TYPES)}"),
        (opts.train_with_img_cls_type not in IMAGE_TOKEN_TYPES,
         f"--train_with_img_cls_type must be one of {', '.join(IMAGE_TOKEN_TYPES)}"),
        (opts.feature_cache not in FEATURE_CACHES, f"--feature_cache must be one of {', '.join(FEATURE_CACHES)}"),
        (opts.init_checkpoint is not None and not Path(opts.init_checkpoint).expanduser().is_file(),
         f"--init_checkpoint file not found: {opts.init_checkpoint}"),
        (opts.clip_weights not in ("openai", "synthetic") and not Path(opts.clip_weights).expanduser().is_file(),
         f"CLIP weights file not found: {opts.clip_weights}; pass --clip_weights openai (cached download), "
         "a ViT-L-14-336px.pt file, or synthetic"),
        (opts.dino_weights is not None and not Path(opts.dino_weights).expanduser().is_file(),
         f"--dino_weights file not found: {opts.dino_weights}"),
    ]
    for bad, message in checks:
        if bad:
            raise TrainError(message)


# ------------------------------------------------------------------------------ data


@dataclass
class TrainingSet:
    """The training samples of all ``--dataset`` folders (their ``test`` split), in one index space."""

    dataset: ConcatDataset
    roots: list[Path]
    samples: list[tuple[int, dict[str, Any]]]  # (dataset number, meta.json sample)
    keys: list[str]  # cache key of each sample: image and mask file identities
    labels: list[int]
    pools: dict[tuple[int, str], list[int]]  # (dataset number, class) -> sample indices (mosaic partners)

    def __len__(self) -> int:
        return len(self.samples)


def load_training_set(opts: TrainOptions) -> TrainingSet:
    """Read and validate every ``DATASETS_ROOT_DIR/DATASET/meta.json`` (``test`` split); ``DatasetError`` if unusable."""
    parts, roots, samples = [], [], []
    for number, name in enumerate(opts.dataset):
        root = Path(opts.datasets_root_dir) / name
        part = CraneDataset(root, split="test", image_size=opts.image_size, k_shot=opts.k_shot,
                            portion=opts.portion, seed=opts.seed)
        parts.append(part)
        roots.append(root)
        samples.extend((number, s) for s in part.samples)
    keys, labels, pools = [], [], {}
    for index, (number, s) in enumerate(samples):
        mask = roots[number] / s["mask_path"] if s["mask_path"] else None
        keys.append(f"{file_identity(roots[number] / s['img_path'])}|{file_identity(mask)}")
        labels.append(int(s["anomaly"]))
        pools.setdefault((number, s["cls_name"]), []).append(index)
    return TrainingSet(ConcatDataset(parts), roots, samples, keys, labels, pools)


@dataclass
class EpochPlan:
    """What epoch ``epoch`` does on this rank, decided identically on every rank from ``(seed, epoch)``."""

    batches: list[list[int]]
    conditioned: list[bool]  # per step: image-conditioned prompts or not
    mosaics: dict[int, list[int]]  # sample index -> its 4 mosaic sources (augmented samples only)


def plan_epoch(data: TrainingSet, opts: TrainOptions, epoch: int, ctx: DistContext) -> EpochPlan:
    """Shuffle with ``DistributedSampler`` (seed ``seed``, epoch ``epoch``); draw augmentations and prompt types."""
    sampler = DistributedSampler(range(len(data)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=opts.seed, drop_last=False)
    sampler.set_epoch(epoch)
    batches = list(BatchSampler(sampler, opts.batch_size, drop_last=False))
    rng = np.random.default_rng([opts.seed, epoch])
    augmented = rng.random(len(data)) < opts.aug_rate
    mosaics = {}
    for index in np.flatnonzero(augmented):
        number, sample = data.samples[index]
        pool = data.pools[(number, sample["cls_name"])]
        mosaics[int(index)] = [pool[j] for j in rng.integers(len(pool), size=4)]
    use_image = opts.train_with_img_cls_type != "none"
    conditioned = [use_image and bool(u < opts.train_with_img_cls_prob) for u in rng.random(len(batches))]
    return EpochPlan(batches, conditioned, mosaics)


def _mosaic_item(data: TrainingSet, sources: Sequence[int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed mosaic image ``3 x S x S`` and its mask ``S x S``."""
    images, masks = [], []
    for index in sources:
        number, s = data.samples[index]
        images.append(data.roots[number] / s["img_path"])
        masks.append(data.roots[number] / s["mask_path"] if s["mask_path"] else None)
    image, mask = mosaic(images, masks)
    return preprocess(image, size), load_mask(mask, size)


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
        return self._frozen[0].text_features(image_embedding, self.image_token_type)


def build_training_model(opts: TrainOptions) -> CraneModel:
    """Frozen CLIP (+ VFM) with a prompt learner initialised from ``seed`` or ``init_checkpoint``."""
    config = CraneConfig.from_options(opts)
    torch.manual_seed(opts.seed)
    quiet = logging.getLogger("crane.detector")  # its "prompts are untrained" warning is the point of training
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = build_model(opts.clip_weights, opts.init_checkpoint, opts.dino_weights, config)
    finally:
        quiet.setLevel(level)
    model.prompt_learner.requires_grad_(True)
    return model


# ------------------------------------------------------------------------- files


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _save_state(path: Path, epoch: int, learner: nn.Module, optimizer: torch.optim.Optimizer,
                settings: dict[str, Any]) -> None:
    """``last.pt``: everything a resumed run needs after ``epoch`` complete epochs (atomic)."""
    state = {"epoch": epoch, "settings": settings, "prompt_learner": learner.state_dict(),
             "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Read ``last.pt`` and check that it was made with the same settings."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise TrainError(f"cannot read the training state {path} ({e}); delete it to start over") from None
    saved = state.get("settings", {})
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
    _write_atomic(path, buffer.getvalue())


def _read_log(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f) if int(row["epoch"]) <= upto_epoch]


# ------------------------------------------------------------------------ training


class Trainer:
    """One process's share of a training run (see the module docstring)."""

    def __init__(self, opts: TrainOptions, ctx: DistContext) -> None:
        self.opts, self.ctx = opts, ctx
        self.dir = run_dir(opts)
        self.settings = result_settings(opts, ctx.world_size)
        self.data = load_training_set(opts)
        self.model = build_training_model(opts).to(ctx.device)
        self.learner = self.model.prompt_learner
        text = PromptTextEncoder(self.model, opts.train_with_img_cls_type)
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            text = DistributedDataParallel(text, device_ids=ids)
        self.text = text
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=opts.learning_rate, betas=ADAM_BETAS)
        self.encoder = FrozenImageEncoder(self.model)
        self.cache = self._make_cache()

    def _make_cache(self) -> Optional[FeatureCache]:
        if self.opts.feature_cache == "off":
            return None
        if self.opts.feature_cache == "memory":
            return FeatureCache()
        o = self.opts
        key = options_key({"clip": file_identity(o.clip_weights), "dino": file_identity(o.dino_weights),
                           "dino_model": o.dino_model, "image_size": o.image_size,
                           "features_list": list(o.features_list), "attn_type": o.attn_type,
                           "both_eattn_dattn": o.both_eattn_dattn, "dattn_batch_mean": o.dattn_batch_mean,
                           "config": asdict(self.model.config)})
        return FeatureCache(self.dir / "feature_cache" / key)

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
        loader = DataLoader(Subset(self.data.dataset, mine), batch_size=self.opts.batch_size, num_workers=workers)
        new: dict[str, Entry] = {}
        bar = tqdm(total=len(missing), desc="encode images", unit="img", disable=not self.ctx.is_main or not missing)
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

    def _entries(self, indices: Sequence[int], plan: EpochPlan) -> tuple[list[Entry], list[int]]:
        """Entries and labels of a batch: cached, or encoded now (mosaics, ``feature_cache off``)."""
        entries: list[Optional[Entry]] = [None] * len(indices)
        labels = [1 if i in plan.mosaics else self.data.labels[i] for i in indices]
        fresh, images, masks = [], [], []
        for j, i in enumerate(indices):
            if i in plan.mosaics:
                image, mask = _mosaic_item(self.data, plan.mosaics[i], self.opts.image_size)
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

    def step(self, entries: Sequence[Entry], labels: Sequence[int], conditioned: bool) -> torch.Tensor:
        """One optimisation step on a batch; returns the detached ``[total, focal, dice, ce]``."""
        device = self.ctx.device
        feats = self.encoder.assemble(entries, device)
        masks = torch.stack([e["mask"] for e in entries]).to(device=device, dtype=torch.float32)
        text = self.text(feats.image_embedding if conditioned else None)
        logits = self.model.patch_logits(feats, text)
        terms = crane_loss(feats.patch_tokens, logits, feats.image_embedding, text, masks,
                           torch.tensor(labels, device=device), self.opts.interpolation,
                           self.opts.use_scorebase_pooling)
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

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch; return the mean loss terms over all steps of all ranks."""
        plan = plan_epoch(self.data, self.opts, epoch, self.ctx)
        sums = torch.zeros(4, dtype=torch.float64)
        bar = tqdm(plan.batches, desc=f"epoch {epoch}/{self.opts.epoch}", unit="batch", disable=not self.ctx.is_main)
        for n, (indices, conditioned) in enumerate(zip(bar, plan.conditioned), start=1):
            entries, labels = self._entries(indices, plan)
            sums += self.step(entries, labels, conditioned).double()
            bar.set_postfix(loss=f"{sums[0].item() / n:.4f}")
        bar.close()
        counts = torch.tensor([float(len(plan.batches)), float(sum(len(b) for b in plan.batches))], dtype=torch.float64)
        if self.ctx.distributed:
            both = torch.cat([sums, counts])
            dist.all_reduce(both)
            sums, counts = both[:4], both[4:]
        means = (sums / counts[0].clamp(min=1)).tolist()
        return {"loss": means[0], "loss_focal": means[1], "loss_dice": means[2], "loss_ce": means[3],
                "images": int(counts[1].item())}

    def fit(self) -> None:
        """Train from the last complete epoch (or 1) to ``epoch``, checkpointing as published."""
        done = self.restore()
        if done >= self.opts.epoch:
            log.info("%s already has %d epochs (asked for %d): nothing to do", self.dir, done, self.opts.epoch)
            return
        rows = _read_log(self.dir / "log.csv", done) if self.ctx.is_main else []
        if self.ctx.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.dir / "args.json", json.dumps({**asdict(self.opts), "world_size": self.ctx.world_size},
                                                             indent=2, default=list) + "\n")
        encode_seconds = self.fill_cache()
        for epoch in range(done + 1, self.opts.epoch + 1):
            start = time.perf_counter()
            stats = self.run_epoch(epoch)
            seconds = time.perf_counter() - start + encode_seconds
            if self.ctx.is_main:
                if epoch % self.opts.save_freq == 0:
                    save_prompt_checkpoint(self.learner, self.dir / f"epoch_{epoch}.pth")
                rows.append({"epoch": epoch, **{k: f"{v:.6f}" for k, v in stats.items() if k != "images"},
                             "images": stats["images"], "seconds": f"{seconds:.3f}",
                             "encode_seconds": f"{encode_seconds:.3f}"})
                _write_log(self.dir / "log.csv", rows)
                _save_state(self.dir / STATE_FILE, epoch, self.learner, self.optimizer, self.settings)
                log.info("epoch [%d/%d] loss %.4f (focal %.4f, dice %.4f, image %.4f) in %.1f s (encoding %.1f s)",
                         epoch, self.opts.epoch, stats["loss"], stats["loss_focal"], stats["loss_dice"],
                         stats["loss_ce"], seconds, encode_seconds)
            barrier(self.ctx)
            encode_seconds = 0.0


def _worker(opts: TrainOptions) -> None:
    ctx = init_distributed(opts.device, opts.devices)
    if ctx.device.type == "cpu" and ctx.distributed:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))
    handler = _log_to_file(run_dir(opts) / "train.log") if ctx.is_main else None
    random.seed(opts.seed)
    np.random.seed(opts.seed)
    try:
        Trainer(opts, ctx).fit()
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _log_to_file(path: Path) -> logging.Handler:
    """Append this logger's messages to ``path`` (the run's ``train.log``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _check_init_checkpoint(opts: TrainOptions) -> None:
    """Load ``init_checkpoint`` into a bare prompt learner of the requested shape (``CheckpointMismatchError`` if
    it does not fit); its width is taken from the checkpoint, the CLIP text width is checked when the model loads."""
    import open_clip

    from crane.models.prompts import PromptLearner, load_prompt_checkpoint

    state = load_prompt_checkpoint(opts.init_checkpoint)
    ctx = state.get("ctx_pos")
    width = ctx.shape[-1] if isinstance(ctx, torch.Tensor) and ctx.ndim else 768
    learner = PromptLearner(nn.Embedding(49408, width), open_clip.get_tokenizer("ViT-L-14-336"), opts.n_ctx,
                            opts.t_n_ctx, opts.depth)
    learner.load_official(state, source=str(opts.init_checkpoint))


def train(opts: TrainOptions) -> Path:
    """Check the options and the data, then train (one process per entry of ``devices``); return the run folder."""
    _check_options(opts)
    load_training_set(opts)  # fail on a bad dataset or checkpoint before spawning processes and loading weights
    if opts.init_checkpoint is not None:
        _check_init_checkpoint(opts)
    nprocs = len(opts.devices) if "WORLD_SIZE" not in os.environ else 1
    try:
        launch(_worker, nprocs, opts)
    except torch.multiprocessing.ProcessRaisedException as e:  # a spawned process stopped: keep its message
        raise TrainError(f"a training process stopped: {str(e).strip().splitlines()[-1]}") from None
    return run_dir(opts)
