"""The public inference API: :class:`Detector` and :class:`Prediction`."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import torch

from . import settings
from .checkpoints import apply_settings, read_checkpoint
from .data.image import ImageInput, preprocess
from .device import precision_error
from .errors import CraneError
from .models.build import build_model
from .models.clip_loader import ClipWeights
from .models.crane import CraneConfig, CraneModel
from .models.memory import ReferenceMemory
from .models.precision import autocast, maybe_compiled
from .models.smoothing import smooth as smooth_on_device
from .models.vfm import VfmWeights
from .models.weights import clip_state_depth, tower_depth_of

log = logging.getLogger(__name__)


ReferenceInput = Union[None, ImageInput, Iterable[ImageInput], ReferenceMemory]
"""What :meth:`Detector.set_reference` takes: images, a ``reference.pt`` path, a memory, or ``None``."""


def as_image_list(images: Union[ImageInput, Iterable[ImageInput]]) -> list[ImageInput]:
    """One image (path, PIL image, ``H x W [x C]`` array) or an iterable of them, as a list."""
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, Iterable) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)):
        return [images]
    return list(images)


@dataclass
class Prediction:
    """``scores``: ``N`` float32 image anomaly scores; ``maps``: ``N x S x S`` float32 smoothed anomaly maps."""

    scores: np.ndarray
    maps: np.ndarray


def build_detector(options: Any, checkpoint: Union[None, str, os.PathLike, Mapping] = None) -> "Detector":
    """The :class:`Detector` of ``options`` (any object with attributes named as the settings and the run
    flags: ``clip_weights``, ``dino_weights``, the :class:`CraneConfig` fields, ``device``, ``precision``,
    ``batch_size``, ``compile``), with ``checkpoint`` (a state dict already read, or a file; default
    ``options.checkpoint``). The one builder behind every entry point; an unusable setting or weights file
    raises :class:`~crane.errors.CraneError`."""
    checkpoint = options.checkpoint if checkpoint is None else checkpoint
    if checkpoint is None:
        log.warning("no prompt-learner checkpoint given: the prompts are untrained (random)")
    try:
        model = build_model(options.clip_weights, checkpoint, options.dino_weights, CraneConfig.from_options(options))
    except ValueError as e:  # e.g. a weights file that is not a CLIP state dict: the input's fault
        if isinstance(e, CraneError):
            raise
        raise CraneError(str(e)) from None
    return Detector(model, options.device, getattr(options, "precision", "fp32"), getattr(options, "batch_size", 8),
                    getattr(options, "compile", False))


class Detector:
    """Zero-shot anomaly detector: images in, image scores and anomaly maps out.

    Results do not depend on how images are batched (unless ``dattn_batch_mean``).
    Build one with :meth:`from_config`.

    ``precision``: ``"fp32"`` (default, the published arithmetic), ``"bf16"`` or ``"fp16"``
    (GPU only): autocast on the image side (CLIP vision tower, VFM); text features and head
    stay float32 (:mod:`crane.models.precision`). ``compile``: run the image side through
    ``torch.compile`` (the first batch, and each new batch shape, pays the compilation; it
    runs uncompiled, with one warning, where compiling fails).

    Few-shot: with reference images of normal parts (:meth:`set_reference`, or ``reference=`` in
    :meth:`from_config`) each image's score and map mix the zero-shot ones with the distance of its
    patches to the references' (``docs/method.md``, "Few-shot"); without references the results are the
    zero-shot ones, unchanged.
    """

    def __init__(self, model: CraneModel, device: Union[str, torch.device] = "cpu", precision: str = "fp32",
                 batch_size: int = 8, compile: bool = False) -> None:
        self.device = torch.device(device)
        problem = precision_error(precision, self.device.type)
        if problem:
            raise ValueError(problem)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' requested but no CUDA GPU is available; use device='cpu'")
        self.model = model.to(self.device).eval()
        self.precision = precision
        self.batch_size = batch_size
        self._encode_image = maybe_compiled(self.model.encode_image, compile, "the image encoder")
        self.reference: Optional[ReferenceMemory] = None
        self.refresh_text_features()

    @classmethod
    def from_config(cls, clip_weights: Union[ClipWeights, str] = "openai",
                    checkpoint: Union[None, str, os.PathLike, Mapping] = None, dino_model: Optional[str] = None,
                    dino_weights: VfmWeights = None, *, device: str = "cpu", precision: str = "fp32",
                    batch_size: int = 8, compile: bool = False, force: bool = False,
                    reference: ReferenceInput = None, coreset_ratio: float = settings.DEFAULT_CORESET_RATIO, few_shot_weight: float = settings.DEFAULT_FEW_SHOT_WEIGHT,
                    **model_settings: Any) -> "Detector":
        """Build a detector. ``dino_model`` and ``model_settings`` are :class:`CraneConfig` fields
        (``features_list``, ``soft_mean``, ``image_size``, ``sigma``, ``attn_type``, ...); ``None`` or left
        out: not given.

        With a checkpoint file, the settings it records (the published ones for the official checkpoints)
        are used where no argument gives them, as on the command line; an argument that contradicts them
        raises :class:`~crane.checkpoints.CheckpointError` unless ``force=True`` (then a warning). The
        rest take the ``api`` defaults of :mod:`crane.settings` (``dino_model="none"``: Crane).
        ``reference``, ``coreset_ratio`` and ``few_shot_weight`` go to :meth:`set_reference`.
        """
        if dino_model is not None:
            model_settings["dino_model"] = dino_model
        fields = {f.name for f in dataclasses.fields(CraneConfig)}
        unknown = sorted(set(model_settings) - fields)
        if unknown:
            raise TypeError(f"unknown model setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        options = SimpleNamespace(**{**{f.name: f.default for f in dataclasses.fields(CraneConfig)}, **model_settings})
        state = checkpoint
        recorded: set = set()
        if checkpoint is not None and not isinstance(checkpoint, Mapping):
            state, info = read_checkpoint(checkpoint)
            for note in apply_settings(options, set(model_settings), info, force):
                log.warning("%s", note)
            recorded = set(info.settings)
        depth = (clip_state_depth(clip_weights) if isinstance(clip_weights, Mapping)
                 else tower_depth_of(options.clip_model, str(clip_weights)))
        settings.scale_to_tower(options, depth, set(model_settings) | recorded)  # defaults follow the tower
        detector = cls(build_model(clip_weights, state, dino_weights, CraneConfig.from_options(options)), device,
                       precision, batch_size, compile)
        if reference is not None:
            detector.set_reference(reference, coreset_ratio, few_shot_weight)
        return detector

    @property
    def config(self) -> CraneConfig:
        return self.model.config

    def refresh_text_features(self) -> None:
        """Recompute the cached text features (after changing the prompt learner)."""
        with torch.no_grad():
            self.text_features = self.model.text_features()

    def set_reference(self, reference: ReferenceInput, coreset_ratio: float = settings.DEFAULT_CORESET_RATIO, few_shot_weight: float = settings.DEFAULT_FEW_SHOT_WEIGHT,
                      use_vfm: bool = True, progress: bool = False, exif_orientation: bool = False,
                      bit_depth: int = 16) -> Optional[ReferenceMemory]:
        """Score from now on with a reference memory of normal images (``None``: zero-shot again).

        ``reference``: reference images (paths, PIL images or ``H x W x 3`` uint8 arrays; one or a list), a
        ``reference.pt`` path (:func:`crane.reference.load_reference`, refused in one line when built with
        other settings) or a :class:`ReferenceMemory`. Images are encoded in batches and kept as a memory
        of their patch features, subsampled to ``coreset_ratio`` (greedy k-centre) with the VFM features
        when a VFM is loaded and ``use_vfm``; ``few_shot_weight`` is the few-shot part's weight ``w``;
        ``exif_orientation``: files are turned as their EXIF tag says (as the command line reads them);
        ``bit_depth``: the bits 16-bit files hold (``--bit_depth``).
        Returns the memory (save it with :func:`crane.reference.save_reference`).
        """
        from . import reference as files

        if reference is None:
            memory = None
        elif isinstance(reference, ReferenceMemory):
            files.check_reference(reference, self.model)
            memory = reference
        elif isinstance(reference, (str, os.PathLike)) and str(reference).endswith(".pt"):
            memory = files.load_reference(reference, self.model)
        else:
            memory = files.build_reference(self, reference, coreset_ratio, few_shot_weight, use_vfm, progress,
                                           exif_orientation, bit_depth)
        self.reference = None if memory is None else memory.to(self.device)
        return self.reference

    @torch.no_grad()
    def encode(self, images: torch.Tensor):
        """Preprocessed batch ``B x 3 x S x S`` -> :class:`~crane.models.crane.ImageFeatures` on the device."""
        with autocast(self.device.type, self.precision):
            return self._encode_image(images.to(self.device, non_blocking=True))

    @torch.no_grad()
    def zero_shot(self, features, image_token_type: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-shot scores ``B`` and unsmoothed maps ``B x S x S`` (float32, on the device) of :meth:`encode`'s
        features; ``image_token_type``: see :meth:`predict_tensor`."""
        text = self.text_features if image_token_type is None else \
            self.model.text_features(features.image_embedding, image_token_type)
        return self.model.head(features, text)

    @torch.no_grad()
    def predict_tensor(self, images: torch.Tensor, image_token_type: Optional[str] = None, smooth: bool = False,
                       exclude: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed batch ``B x 3 x S x S`` -> (scores ``B``, maps ``B x S x S``), on CPU, float32.

        ``image_token_type`` (e.g. ``"pad_suffix"``) conditions the prompts on each image's
        embedding (``--train_with_img_cls_prob 1``); ``None`` uses the cached text pair.
        ``smooth``: apply the Gaussian smoothing (``sigma``) where the maps are, before they
        leave the device; otherwise the maps are returned unsmoothed. ``exclude``: see :meth:`forward`.
        """
        scores, maps = self.forward(images, image_token_type, exclude)
        if smooth:
            maps = smooth_on_device(maps, self.config.sigma)
        return scores.cpu(), maps.cpu()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, image_token_type: Optional[str] = None,
                exclude: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`predict_tensor` (unsmoothed), but the results stay on the device: scores ``B`` and
        maps ``B x S x S``, float32. The copy of ``images`` to the device does not block.

        With a reference memory the few-shot part is mixed in; ``exclude`` (``B`` reference indices, ``-1``
        for none) then scores image ``b`` without the patches of reference ``exclude[b]`` (leave-one-out).
        """
        features = self.encode(images)
        scores, maps = self.zero_shot(features, image_token_type)
        if self.reference is None:
            if exclude is not None:
                raise ValueError("exclude needs a reference memory (set_reference)")
            return scores, maps
        return self.reference.fuse(features, scores, maps, exclude)

    def predict(self, images: Union[ImageInput, Iterable[ImageInput]], batch_size: Optional[int] = None,
                progress: bool = False, leave_one_out: bool = False) -> Prediction:
        """Score images (paths, PIL images or ``H x W x 3`` uint8 arrays; one or a list).

        ``leave_one_out`` (with a reference memory): an image that is one of the references (the same
        preprocessed pixels) is scored against the memory without its own patches, as a new normal image
        would be; for calibrating thresholds on the reference images themselves.
        """
        images = as_image_list(images)
        if leave_one_out and (self.reference is None or self.reference.references < 2):
            raise ValueError("leave-one-out scoring needs a reference memory of at least two images")
        bs = batch_size or self.batch_size
        size = self.config.image_size
        scores, maps = [], []
        batches = range(0, len(images), bs)
        if progress:
            from crane.logs import progress

            batches = progress(batches, desc="predict", unit="batch")
        for start in batches:
            batch = torch.stack([preprocess(img, size) for img in images[start:start + bs]])
            exclude = self.reference.exclusions(batch) if leave_one_out else None
            s, m = self.predict_tensor(batch, smooth=True, exclude=exclude)
            scores.append(s.numpy())
            maps.append(m.numpy())
        if not scores:
            return Prediction(np.zeros(0, np.float32), np.zeros((0, size, size), np.float32))
        return Prediction(np.concatenate(scores).astype(np.float32), np.concatenate(maps).astype(np.float32))
