"""Crane / Crane+ as an anomalib model: :class:`Crane`, for anomalib's ``Engine``, datamodules, metrics and export.

    from anomalib.data import Folder
    from anomalib.engine import Engine
    from crane.integrations.anomalib import Crane

    model = Crane(checkpoint="checkpoints/trained_on_mvtec_crane/epoch_5.pth")  # settings from the checkpoint
    data = Folder(name="my_part", root="datasets/data/custom", normal_dir="train/my_part/good",
                  normal_test_dir="test/my_part/good", abnormal_dir="test/my_part/defect",
                  mask_dir="test/my_part/masks", val_split_mode="same_as_test")
    Engine().test(model, datamodule=data)  # image_AUROC and pixel_AUROC as test.py gives them

    few = Crane(checkpoint=..., k_shot=4)  # few-shot: a reference memory of 4 normal training images
    Engine().test(few, datamodule=data)

What it reproduces of ``crane`` (the README section "Crane in anomalib" has the details):

* Input: :class:`CraneResize` resizes 8-bit images with PIL bicubic and masks as
  :func:`crane.data.image.load_mask` does (binary mask, PIL bilinear, > 0.5), then the
  OpenAI mean/std normalisation: the tensors ``crane.Detector.predict`` builds.
* Model: the graph :class:`crane.export.graph.InferenceGraph` of a ``crane.Detector``
  (scores ``B``, Gaussian-smoothed maps ``B x S x S``), as ``pred_score`` / ``anomaly_map``.
* Post-processing: :class:`CranePostProcessor` normalises like anomalib's (threshold -> 0.5,
  validation min / max -> 0 / 1) but piecewise linearly, so it keeps the order of all values
  within the validation range and the AUROCs equal ``test.py``'s.
* Few-shot (``k_shot`` > 0, ``LearningType.FEW_SHOT``): a reference memory of ``k_shot`` normal images
  (``docs/method.md``, "Few-shot"), taken as anomalib's WinCLIP takes its references: the first
  ``k_shot`` images of the ``few_shot_source`` folder (sorted by name), else the first ``k_shot`` images
  the datamodule's training loader yields. The memory is part of :attr:`Crane.model`, so it is exported
  with it.
* Export: anomalib's exporter (``Engine.export``) traces pre-processor, model and
  post-processor; :class:`ExportPreprocess` replaces the PIL resize by the same arithmetic in
  tensor operations (PIL's bicubic weights, 8-bit rounding after each pass), so the exported
  file takes anomalib's input (``B x 3 x H x W`` in [0, 1], any ``H``, ``W``).

Requires the optional extra: ``pip install 'crane[anomalib]'`` (``setup.sh`` installs it);
exporting also needs ``crane[deploy]`` (onnxscript, OpenVINO).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn


class AnomalibNotInstalledError(ImportError):
    """anomalib, needed by :mod:`crane.integrations.anomalib`, is not installed (one-line message)."""


try:
    from anomalib import LearningType
    from anomalib.data import Batch, InferenceBatch
    from anomalib.metrics import Evaluator
    from anomalib.models.components import AnomalibModule
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
    from anomalib.visualization import Visualizer
except ImportError as error:
    raise AnomalibNotInstalledError(
        f"crane.integrations.anomalib needs anomalib 2.7 ({error}); install it with "
        "pip install 'crane[anomalib]' (or run ./setup.sh)") from None

from torchvision import tv_tensors
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from crane import settings as crane_settings
from crane.data.folders import walk_images
from crane.data.image import OPENAI_MEAN, OPENAI_STD, load_mask
from crane.detector import Detector
from crane.export.graph import InferenceGraph
from crane.models.crane import CraneConfig

log = logging.getLogger(__name__)

__all__ = ["Crane", "CraneResize", "ExportPreprocess", "CranePreProcessor", "CranePostProcessor", "CraneTorchModel",
           "AnomalibNotInstalledError"]

ONNX_OPSET = 18
"""Opset of anomalib's exporter for Crane (anomalib's default, 14, lacks the ``Resize`` antialias that
timm's DINOv2 position-embedding resampling needs while exporting; crane's own exporter uses 18 too)."""
_SINGLE_FILE_LIMIT = 1_900_000_000  # bytes of weights kept inside one .onnx (protobuf's limit is 2 GiB)


# ------------------------------------------------------------------------------------------- input


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """8-bit values of an image tensor: uint8 as is, float in [0, 1] rounded from ``x * 255``."""
    if image.dtype == torch.uint8:
        return image
    return (image * 255.0).round().clamp(0, 255).to(torch.uint8)


class CraneResize(Resize):
    """Resize to ``size x size`` as ``crane`` reads its inputs (a torchvision ``Resize``, so that anomalib's
    datamodules apply it per image before batching).

    Images (``... x C x H x W``, ``C`` 1 or 3; float in [0, 1] or uint8): 8-bit values, PIL bicubic
    (antialiased), as :func:`crane.data.image.preprocess`; float in, float ``uint8 / 255`` out. Images
    already ``size x size`` are only rounded to 8 bits (PIL's resize to the same size is a copy).
    Masks (``... x H x W``): binary (``> 0``), PIL bilinear, ``> 0.5``, as :func:`crane.data.image.load_mask`;
    same dtype out. Other inputs (boxes, ...) are resized by torchvision's kernel.
    """

    def __init__(self, size: int) -> None:
        super().__init__((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True)
        self.side = int(size)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return tv_tensors.wrap(self._resize_masks(inpt), like=inpt)
        if isinstance(inpt, tv_tensors.Image) or type(inpt) is torch.Tensor:
            out = self._resize_images(inpt)
            return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out
        return super().transform(inpt, params)

    def _resize_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = _to_uint8(images.detach())
        if tuple(pixels.shape[-2:]) != (self.side, self.side):
            flat = pixels.reshape(-1, *pixels.shape[-3:]).cpu()
            resized = [self._pil_bicubic(image) for image in flat]
            pixels = torch.stack(resized).reshape(*pixels.shape[:-2], self.side, self.side).to(images.device)
        return pixels if images.dtype == torch.uint8 else pixels.float().div_(255.0)

    def _pil_bicubic(self, image: torch.Tensor) -> torch.Tensor:
        """``C x H x W`` uint8 -> ``C x S x S`` uint8 (PIL bicubic, in RGB or L mode)."""
        channels = image.shape[0]
        if channels not in (1, 3):
            raise ValueError(f"CraneResize takes 1- or 3-channel images, got {channels} channels")
        array = image.permute(1, 2, 0).numpy()
        pil = Image.fromarray(np.ascontiguousarray(array[:, :, 0] if channels == 1 else array))  # L or RGB
        out = np.asarray(pil.resize((self.side, self.side), Image.BICUBIC)).copy()
        return torch.from_numpy(out).reshape(self.side, self.side, channels).permute(2, 0, 1)

    def _resize_masks(self, masks: torch.Tensor) -> torch.Tensor:
        flat = (masks.detach().reshape(-1, *masks.shape[-2:]) > 0).to(torch.uint8).cpu().numpy()
        resized = torch.stack([load_mask(m, self.side) for m in flat]) if len(flat) else \
            torch.zeros(0, self.side, self.side)
        return resized.reshape(*masks.shape[:-2], self.side, self.side).to(masks.dtype).to(masks.device)


def _bicubic_weights(n_in: torch.Tensor, positions: torch.Tensor, n_out: int) -> torch.Tensor:
    """PIL's 8-bit bicubic resampling matrix ``n_out x n_in``, float32 (``positions``: ``0 .. n_in - 1`` as
    float; ``n_in``: their count as a 1-element float tensor, so that the size may be symbolic while exporting).

    Each output pixel ``i`` takes the input pixels around ``center = (i + 0.5) * n_in / n_out`` with the
    cubic kernel (``a = -0.5``) stretched by ``max(n_in / n_out, 1)``, normalised to sum 1 over the
    pixels inside the image, then quantised to PIL's 22 fractional bits (Pillow's ``Resample.c``); computed in
    float64 as PIL does (exact in float32 once quantised).
    """
    positions, n_in = positions.double(), n_in.double()  # PIL's arithmetic: quantised float32 weights would differ
    scale = n_in / n_out
    inverse_stretch = 1.0 / scale.clamp(min=1.0)
    centers = (torch.arange(n_out, dtype=positions.dtype, device=positions.device) + 0.5) * scale
    x = ((positions[None, :] - centers[:, None] + 0.5) * inverse_stretch).abs()
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    kernel = torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    one = float(1 << 22)
    return (torch.trunc(kernel * one + torch.where(kernel < 0, -0.5, 0.5)) / one).float()


def _round_8bit(values: torch.Tensor) -> torch.Tensor:
    """PIL's rounding of a resampled 8-bit value: half up, clipped to 0..255."""
    return torch.floor(values + 0.5).clamp(0.0, 255.0)


def _pillow_vertical_first() -> bool:
    """Whether the installed Pillow may resample vertically first (Pillow 13 does when the height shrinks by
    more than twice as many pixels as the width; earlier versions always resample horizontally first)."""
    import PIL

    return int(PIL.__version__.split(".")[0]) >= 13


class ExportPreprocess(nn.Module):
    """:class:`CraneResize` + normalisation in tensor operations, for export: ``B x 3 x H x W`` in [0, 1]
    (any ``H``, ``W``) -> ``B x 3 x S x S`` CLIP-normalised.

    PIL's two 8-bit passes as matrix products (:func:`_bicubic_weights`), each rounded to 8 bits as PIL
    does, in PIL's order: horizontal then vertical, except (``vertical_first``, Pillow 13) when the height
    shrinks by more than twice as many pixels as the width. The sums are float32 where PIL's are
    integers, so a value lying within ~1e-5 of a rounding boundary may come out one 8-bit level apart.
    """

    def __init__(self, size: int, vertical_first: Optional[bool] = None) -> None:
        super().__init__()
        self.side = int(size)
        self.vertical_first = _pillow_vertical_first() if vertical_first is None else bool(vertical_first)
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = _round_8bit(images * 255.0)
        rows = torch.arange(images.shape[-2], dtype=pixels.dtype, device=pixels.device)
        cols = torch.arange(images.shape[-1], dtype=pixels.dtype, device=pixels.device)
        height, width = rows[-1:] + 1.0, cols[-1:] + 1.0  # the sizes as tensors (symbolic while exporting)
        horizontal = _bicubic_weights(width, cols, self.side).transpose(0, 1)
        vertical = _bicubic_weights(height, rows, self.side)
        resized = _round_8bit(vertical @ _round_8bit(pixels @ horizontal))
        if self.vertical_first:  # both orders, then the one Pillow takes for this size (no shape-dependent branch)
            other = _round_8bit(_round_8bit(vertical @ pixels) @ horizontal)
            first = (height > self.side) & (height - self.side > 2.0 * (width - self.side))
            resized = torch.where(first, other, resized)
        return (resized / 255.0 - self.mean) / self.std


class CranePreProcessor(PreProcessor):
    """Crane's input at model size ``size``: :class:`CraneResize` then the OpenAI mean/std, in the
    Lightning loops; :class:`ExportPreprocess` in ``forward`` (the path anomalib's export traces)."""

    def __init__(self, size: int) -> None:
        super().__init__(transform=Compose([CraneResize(size), Normalize(mean=OPENAI_MEAN, std=OPENAI_STD)]))
        self.export_transform = ExportPreprocess(size)

    def checkpoint_config(self) -> dict[str, Any]:
        """Nothing to store: the pre-processor follows the model's ``image_size``."""
        return {}

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Keep the pre-processor built from the model's ``image_size`` (``config`` is ignored)."""
        del config


# ------------------------------------------------------------------------------------------ output


class CranePostProcessor(PostProcessor):
    """anomalib's post-processor with an order-preserving normalisation.

    anomalib's ``PostProcessor`` maps a value ``x`` to ``clamp((x - t) / (max - min) + 0.5, 0, 1)``
    (``t`` the adaptive threshold, ``min`` / ``max`` from the validation set): unless ``t`` is the
    midpoint, values of the validation range are clamped to 0 or 1, become ties and change the
    AUROCs. Here ``[min, t]`` maps linearly onto ``[0, 0.5]`` and ``[t, max]`` onto ``[0.5, 1]``, so
    the threshold is still 0.5 (the same labels and masks at the default sensitivity) and values
    inside the validation range keep their order; values outside it are clamped as anomalib does.
    """

    @staticmethod
    def _normalize(preds: Optional[torch.Tensor], norm_min: torch.Tensor, norm_max: torch.Tensor,
                   threshold: torch.Tensor) -> Optional[torch.Tensor]:
        """``preds`` (any shape) -> normalised to [0, 1] (unchanged while ``min`` / ``max`` are unknown)."""
        if preds is None:
            return preds
        threshold = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
        span = torch.where(preds < threshold, threshold - norm_min, norm_max - threshold)
        usable = span > 0
        scaled = 0.5 + 0.5 * (preds - threshold) / torch.where(usable, span, torch.ones_like(span))
        degenerate = torch.where(preds > threshold, 1.0, torch.where(preds < threshold, 0.0, 0.5))
        normalized = torch.where(usable, scaled, degenerate).clamp(0.0, 1.0)
        known = ~torch.isnan(norm_min) & ~torch.isnan(norm_max)
        return torch.where(known, normalized, preds)


class CraneTorchModel(nn.Module):
    """The module anomalib runs and exports: CLIP-normalised ``B x 3 x S x S`` -> ``InferenceBatch`` with
    ``pred_score`` (``B``) and ``anomaly_map`` (``B x S x S``, Gaussian-smoothed), from the graph of a
    ``crane.Detector`` (:class:`crane.export.graph.InferenceGraph`)."""

    def __init__(self, graph: InferenceGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        scores, maps = self.graph(images)
        return InferenceBatch(pred_score=scores, anomaly_map=maps)


# ------------------------------------------------------------------------------------------- model


class Crane(AnomalibModule):
    """Crane / Crane+ zero-shot anomaly detection as an anomalib model.

    Built as ``crane.Detector.from_config`` builds a detector. Settings left ``None`` are taken from the
    checkpoint (the settings ``train.py`` records, or an official checkpoint's published ones), else
    ``Detector.from_config``'s defaults; a given setting that contradicts the checkpoint is an error
    unless ``force``.

    Args:
        checkpoint: prompt-learner checkpoint file (``None``: untrained prompts, with a warning).
        clip_weights: ``"openai"`` (the cached OpenAI ViT-L/14@336 file), a weights file, or ``"synthetic"``.
        dino_weights: DINOv2 / DINO / SAM weights file for Crane+ (``None``: the cached hub file).
        dino_model: ``none`` (Crane) or ``dinov2`` / ``dino`` / ``sam`` (Crane+).
        features_list: CLIP blocks whose tokens are scored (1-based).
        soft_mean: average the per-layer maps with a softmax weighting.
        attn_type: E-Attn attention (``qq+kk+vv``, ...).
        both_eattn_dattn: Crane+: score the E-Attn tokens beside the D-Attn ones.
        use_scorebase_pooling: image score from score-based token pooling.
        n_ctx: learnable context tokens per prompt (must match the checkpoint).
        t_n_ctx: learnable tokens per deep text layer (must match the checkpoint).
        depth: text layers with learnable tokens (must match the checkpoint).
        image_size: model input side ``S`` (images are resized to ``S x S``).
        sigma: Gaussian smoothing of the maps, in pixels (0: none).
        dattn_batch_mean: Crane+ as published: D-Attn's mean over the batch (maps then depend on batch mates).
        layer_aliasing: the published E-Attn layer aliasing.
        eattn_layers: how many final CLIP blocks run E-Attn.
        dattn_gamma: D-Attn sharpening exponent.
        force: run with settings that contradict the checkpoint's.
        k_shot: reference images of the few-shot memory (0: zero-shot).
        few_shot_source: a folder of normal images to take them from (default: the datamodule's training images).
        coreset_ratio: fraction of the reference patches kept (greedy k-centre coreset; 1: all).
        few_shot_weight: weight of the few-shot part of scores and maps.
        pre_processor: ``True`` for :class:`CranePreProcessor` (crane's input), or anomalib's choices.
        post_processor: ``True`` for :class:`CranePostProcessor`, or anomalib's choices.
        evaluator: anomalib's evaluator (``True``: image and pixel AUROC and F1).
        visualizer: anomalib's visualizer.
    """

    def __init__(
        self,
        checkpoint: Optional[str] = None,
        clip_weights: str = "openai",
        dino_weights: Optional[str] = None,
        dino_model: Optional[str] = None,
        features_list: Optional[Sequence[int]] = None,
        soft_mean: Optional[bool] = None,
        attn_type: Optional[str] = None,
        both_eattn_dattn: Optional[bool] = None,
        use_scorebase_pooling: Optional[bool] = None,
        n_ctx: Optional[int] = None,
        t_n_ctx: Optional[int] = None,
        depth: Optional[int] = None,
        image_size: int = CraneConfig.image_size,
        sigma: float = CraneConfig.sigma,
        dattn_batch_mean: bool = CraneConfig.dattn_batch_mean,
        layer_aliasing: bool = CraneConfig.layer_aliasing,
        eattn_layers: int = CraneConfig.eattn_layers,
        dattn_gamma: float = CraneConfig.dattn_gamma,
        force: bool = False,
        k_shot: int = 0,
        few_shot_source: Optional[str] = None,
        coreset_ratio: float = crane_settings.DEFAULT_CORESET_RATIO,
        few_shot_weight: float = crane_settings.DEFAULT_FEW_SHOT_WEIGHT,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        problems = crane_settings.problems({"coreset_ratio": coreset_ratio, "few_shot_weight": few_shot_weight},
                                           "inspect")
        if k_shot < 0 or (few_shot_source is not None and not k_shot):
            problems.append(f"k_shot must be > 0 with few_shot_source, and >= 0, got {k_shot}")
        if few_shot_source is not None and not Path(few_shot_source).expanduser().is_dir():
            problems.append(f"few_shot_source {few_shot_source}: no such folder")
        if problems:
            raise ValueError("; ".join(problems))
        given = {"dino_model": dino_model, "features_list": features_list, "soft_mean": soft_mean,
                 "attn_type": attn_type, "both_eattn_dattn": both_eattn_dattn,
                 "use_scorebase_pooling": use_scorebase_pooling, "n_ctx": n_ctx, "t_n_ctx": t_n_ctx, "depth": depth,
                 "image_size": image_size, "sigma": sigma, "dattn_batch_mean": dattn_batch_mean,
                 "layer_aliasing": layer_aliasing, "eattn_layers": eattn_layers, "dattn_gamma": dattn_gamma}
        # the checkpoint's settings under the given ones, as Detector.from_config (and the command line) decides
        detector = Detector.from_config(clip_weights=clip_weights, checkpoint=checkpoint, dino_weights=dino_weights,
                                        device="cpu", force=force,
                                        **{name: value for name, value in given.items() if value is not None})
        settings = dataclasses.asdict(detector.config)
        super().__init__(
            pre_processor=CranePreProcessor(settings["image_size"]) if pre_processor is True else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        if settings["dattn_batch_mean"] and settings["dino_model"] != "none":
            log.warning("dattn_batch_mean: each map depends on the images batched with it (anomalib's batches, "
                        "not the published ones), so the numbers differ from test.py's")
        self.settings = settings
        self.k_shot, self.coreset_ratio, self.few_shot_weight = int(k_shot), float(coreset_ratio), float(few_shot_weight)
        self.few_shot_source = None if few_shot_source is None else Path(few_shot_source).expanduser()
        self._detector = detector  # builds the reference memory in setup (few-shot)
        self.model = CraneTorchModel(InferenceGraph.from_detector(detector))

    @property
    def learning_type(self) -> LearningType:
        """Zero-shot, or few-shot with ``k_shot`` reference images (nothing is trained either way)."""
        return LearningType.FEW_SHOT if self.k_shot else LearningType.ZERO_SHOT

    def setup(self, stage: str) -> None:
        """Few-shot: build the reference memory once, from :meth:`reference_images`, into :attr:`model`."""
        del stage
        if not self.k_shot or self._detector.reference is not None:
            return
        images = self.reference_images()
        log.info("few-shot: a reference memory of %d normal images%s", len(images),
                 f" from {self.few_shot_source}" if self.few_shot_source else " from the training images")
        self._detector.set_reference(images, self.coreset_ratio, self.few_shot_weight, exif_orientation=True)
        self.model = CraneTorchModel(InferenceGraph.from_detector(self._detector))

    def reference_images(self) -> list[Any]:
        """The ``k_shot`` reference images: the first of ``few_shot_source`` (paths, sorted), else the first the
        datamodule's training loader yields (``H x W x 3`` uint8 arrays of its ``[0, 1]`` images, which are
        ``uint8 / 255`` as anomalib reads files). ``ValueError`` when there are fewer."""
        if self.few_shot_source is not None:
            found: list[Any] = walk_images(self.few_shot_source)[:self.k_shot]
            where = str(self.few_shot_source)
        else:
            found = []
            for batch in self.trainer.datamodule.train_dataloader():
                for image in batch.image[:self.k_shot - len(found)]:
                    found.append(_to_uint8(image).permute(1, 2, 0).cpu().numpy())
                if len(found) == self.k_shot:
                    break
            where = "the datamodule's training images"
        if len(found) < self.k_shot:
            raise ValueError(f"k_shot {self.k_shot}: {where} hold only {len(found)} images")
        return found

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No trainer arguments of its own."""
        return {}

    @staticmethod
    def configure_optimizers() -> None:
        """Nothing to optimise (the prompts come from the checkpoint)."""
        return

    def configure_post_processor(self) -> PostProcessor:
        """:class:`CranePostProcessor` (anomalib's normalisation, order-preserving)."""
        return CranePostProcessor()

    def validation_step(self, batch: Batch, *args, **kwargs) -> Batch:
        """Predict the validation batch (anomalib's post-processor collects thresholds and min / max from it)."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def to_onnx(self, export_root: Path | str, model_file_name: str = "model",
                input_size: tuple[int, int] | None = None, **kwargs: Any) -> Path:
        """anomalib's ONNX export (``to_openvino`` converts it), at opset :data:`ONNX_OPSET` unless ``opset_version``
        is given, optimised once as ``crane.export`` does: every sub-graph that does not depend on the input is
        folded to a constant, however large (the exporter's own pass stops at small sizes and would leave, e.g.,
        DINOv2's position-embedding resampling: an antialiased ``Resize`` that OpenVINO does not compute as torch
        does)."""
        if isinstance(self.post_processor, PostProcessor) and torch.isnan(self.post_processor.image_min):
            log.warning("exporting without normalisation statistics (no validation has run): the file outputs raw "
                        "scores and maps and all-False labels and masks; run Engine.test or Engine.validate on your "
                        "data first to have them in the file")
        kwargs.setdefault("opset_version", ONNX_OPSET)
        kwargs.setdefault("optimize", False)  # _fold_constants optimises
        path = super().to_onnx(export_root, model_file_name, input_size, **kwargs)
        _fold_constants(Path(path))
        return path


def _fold_constants(path: Path) -> None:
    """Rewrite the ONNX file ``path`` (and the ``path.data`` torch's exporter writes beside it) with its
    input-independent sub-graphs folded: one file, or ``path.data`` beyond ~1.9 GB of weights."""
    import onnx_ir as ir
    import onnxscript.optimizer

    model = ir.external_data.load_to_model(ir.load(path))  # every weight in memory: the files can be replaced
    model = onnxscript.optimizer.optimize(model, input_size_limit=1 << 40, output_size_limit=1 << 40)
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = f"{path.name}.data" if weights > _SINGLE_FILE_LIMIT else None
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        ir.save(model, Path(tmp) / path.name, external_data=external)
        (path.parent / f"{path.name}.data").unlink(missing_ok=True)
        for item in Path(tmp).iterdir():
            os.replace(item, path.parent / item.name)
