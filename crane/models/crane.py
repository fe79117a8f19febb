"""The Crane / Crane+ model: frozen CLIP (+ VFM) with E-Attn, D-Attn and learnable prompts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from .errors import ModelSettingsError
from .head import TAU, anomaly_probability_maps, image_scores, patch_logits
from .prompts import PromptLearner, encode_text
from .vfm import VisionFoundationModel, dattn_attention
from .vision import CraneVisionEncoder, resample_tokens


def _config_from_options(cls, options: Any) -> "CraneConfig":
    """The config of any object whose attributes are named as the settings (parsed arguments,
    ``EvalOptions``, ``TrainOptions``); fields it lacks keep their defaults."""
    values = {f.name: getattr(options, f.name) for f in fields(cls) if hasattr(options, f.name)}
    if "features_list" in values:
        values["features_list"] = tuple(int(i) for i in values["features_list"])
    return cls(**values)


CraneConfig = make_dataclass(
    "CraneConfig",
    [(s.name, (s.type if not s.many else tuple) if s.default_for("api") is not None else Optional[s.type],
      field(default=s.default_for("api")))
     for s in settings.SETTINGS if "config" in s.records],
    namespace={"from_options": classmethod(_config_from_options), "__module__": __name__,
               "__doc__": "The model's settings: the ``config`` settings of :data:`crane.settings.SETTINGS`, with "
                          "their ``api`` defaults (``layer_aliasing`` reproduces quirk 1, ``dattn_batch_mean`` "
                          "quirk 3; ``eattn_layers=None``: the tower rule, 19 of 24 blocks)."})


@dataclass
class ImageFeatures:
    """Normalised image embedding ``B x E`` and token sets, each ``B x L x E``; with a VFM also its patch
    features ``B x C x H x W`` as the VFM gives them (not normalised; a reference memory compares them)."""

    image_embedding: torch.Tensor
    patch_tokens: list[torch.Tensor]
    vfm_features: Optional[torch.Tensor] = None


@dataclass
class ImageParts:
    """:meth:`CraneModel.encode_image` before its only batch-dependent step (D-Attn with the
    batch-wide mean): the normalised embedding ``B x E``, the normalised E-Attn token sets by
    layer (``B x L x E``), and D-Attn's inputs — its input stream ``t`` by layer (``B x N x D``)
    and the VFM features ``B x C x H x W`` (``None`` for Crane)."""

    image_embedding: torch.Tensor
    eattn: dict[int, torch.Tensor]
    dattn_inputs: dict[int, torch.Tensor]
    vfm_features: Optional[torch.Tensor]


class CraneModel(nn.Module):
    """Crane (``vfm=None``) or Crane+ (with a VFM for D-Attn).

    Only ``prompt_learner`` has trainable parameters.
    """

    def __init__(self, clip: nn.Module, tokenizer, config: CraneConfig,
                 vfm: Optional[VisionFoundationModel] = None) -> None:
        super().__init__()
        depth = len(clip.visual.transformer.resblocks)
        if config.eattn_layers is None:  # the tower rule of the one declaration (19 of 24 blocks)
            config = dataclasses.replace(config, eattn_layers=settings.BY_NAME["eattn_layers"].tower_rule(depth))
        self.config = config
        self.clip = clip.eval().requires_grad_(False)
        self.vision = CraneVisionEncoder(clip.visual, config.attn_type, config.eattn_layers, config.layer_aliasing)
        self.vfm = vfm
        self.prompt_learner = PromptLearner(clip.token_embedding, tokenizer, config.n_ctx, config.t_n_ctx, config.depth)
        bad = [i for i in config.features_list if not 1 <= i <= depth]
        if bad:
            raise ModelSettingsError(f"features_list {bad} outside the vision tower's blocks 1..{depth}")

    def text_features(self, image_embedding: Optional[torch.Tensor] = None, image_token_type: str = "pad_suffix",
                      published_rounding: bool = True) -> torch.Tensor:
        """Normalised [normal, anomalous] text features: ``1 x 2 x E``, or ``B x 2 x E`` when
        conditioned on normalised image embeddings ``B x E``. ``published_rounding``: see
        :func:`~crane.models.prompts.encode_text` (training passes ``False``, the faster order)."""
        prompts, ids = self.prompt_learner(image_embedding, image_token_type)
        feats = encode_text(self.clip, prompts, ids, self.prompt_learner.compound_prompts_text,
                            published_rounding).float()
        feats = torch.stack(feats.chunk(2, dim=0), dim=1)
        return F.normalize(feats, dim=-1)

    @property
    def layers(self) -> list[int]:
        """The requested layers in the order the published code visits them (block order, once each)."""
        return sorted(set(self.config.features_list))

    @property
    def set_layout(self) -> list[tuple[str, int]]:
        """``(kind, layer)`` of each token set, in the published order: with a VFM every requested
        layer gives its D-Attn set, then (``both_eattn_dattn``) its E-Attn set; without, its E-Attn set."""
        layout: list[tuple[str, int]] = []
        for layer in self.layers:
            if self.vfm is not None:
                layout.append(("dattn", layer))
                if not self.config.both_eattn_dattn:
                    continue
            layout.append(("eattn", layer))
        return layout

    def image_parts(self, images: torch.Tensor) -> ImageParts:
        """``B x 3 x S x S`` CLIP-normalised images -> :class:`ImageParts` (everything per image)."""
        dattn_layers = self.layers if self.vfm is not None else ()
        streams = self.vision.forward_features(images, self.layers, dattn_layers)
        embedding = F.normalize(self.vision.project(streams.xo[:, 0]).float(), dim=-1)
        vfm_features = self.vfm(images) if self.vfm is not None else None
        eattn: dict[int, torch.Tensor] = {}
        projected: dict[int, torch.Tensor] = {}  # aliased layers (quirk 1) share one stream: project it once
        for kind, layer in self.set_layout:
            if kind != "eattn":
                continue
            stream = streams.tokens(layer)
            if vfm_features is not None and vfm_features.shape[-2:] != self._grid(stream):
                # The published code resizes these tokens to the VFM grid (DINO v1, SAM) as the layer is
                # reached, so the resized copy holds that layer's own refined tokens, not the aliased ones.
                tokens = resample_tokens(streams.own[layer][:, 1:], tuple(vfm_features.shape[-2:]))
                eattn[layer] = F.normalize(self.vision.project(tokens).float(), dim=-1)
                continue
            if id(stream) not in projected:
                projected[id(stream)] = F.normalize(self.vision.project(stream[:, 1:]).float(), dim=-1)
            eattn[layer] = projected[id(stream)]
        return ImageParts(embedding, eattn, streams.dattn_inputs, vfm_features)

    @staticmethod
    def _grid(stream: torch.Tensor) -> tuple[int, int]:
        g = round((stream.shape[1] - 1) ** 0.5)
        return (g, g)

    def dattn_sets(self, dattn_inputs: dict[int, torch.Tensor], vfm_features: torch.Tensor) -> dict[int, torch.Tensor]:
        """Normalised D-Attn token sets by layer (``B x HW x E``); with ``dattn_batch_mean`` the
        similarity mean is over the images given together (quirk 3)."""
        cfg = self.config
        attn = dattn_attention(vfm_features, self.vfm.beta, cfg.dattn_gamma, cfg.dattn_batch_mean)
        size = tuple(vfm_features.shape[-2:])
        return {layer: F.normalize(self.vision.project(self.vision.dattn_tokens(t, layer, attn, size)).float(), dim=-1)
                for layer, t in dattn_inputs.items()}

    def assemble(self, parts: ImageParts, dattn: Optional[dict[int, torch.Tensor]] = None) -> ImageFeatures:
        """Token sets in :attr:`set_layout` order; ``dattn`` defaults to :meth:`dattn_sets` of ``parts``."""
        if dattn is None and parts.vfm_features is not None:
            dattn = self.dattn_sets(parts.dattn_inputs, parts.vfm_features)
        sets = [dattn[layer] if kind == "dattn" else parts.eattn[layer] for kind, layer in self.set_layout]
        return ImageFeatures(parts.image_embedding, sets, parts.vfm_features)

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """``B x 3 x S x S`` CLIP-normalised images -> normalised embedding and token sets."""
        return self.assemble(self.image_parts(images))

    def patch_logits(self, features: ImageFeatures, text: torch.Tensor) -> list[torch.Tensor]:
        """One ``B x L x 2`` logit tensor per token set (temperature 0.07)."""
        return [patch_logits(tok, text) for tok in features.patch_tokens]

    def scores(self, features: ImageFeatures, logits: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """Image anomaly scores ``B`` (score-based pooling unless disabled)."""
        if self.config.use_scorebase_pooling:
            return image_scores(features.patch_tokens, logits, features.image_embedding, text)
        return (features.image_embedding[:, None] @ text.transpose(-1, -2) / TAU)[:, 0].softmax(-1)[:, 1]

    def maps(self, logits: list[torch.Tensor], mode: str = "bilinear") -> torch.Tensor:
        """Unsmoothed anomaly maps ``B x S x S`` (channel 1 of the probability maps)."""
        return anomaly_probability_maps(logits, self.config.image_size, self.config.soft_mean, mode)[:, 1]

    def head(self, features: ImageFeatures, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded images and text features (``1 x 2 x E``, or ``B x 2 x E`` image-conditioned) ->
        (image scores ``B``, unsmoothed maps ``B x S x S``), float32."""
        logits = self.patch_logits(features, text)
        return self.scores(features, logits, text).float(), self.maps(logits).float()

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``B x 3 x S x S`` CLIP-normalised images and text features -> (scores ``B``, unsmoothed maps
        ``B x S x S``), float32: the test-time path that :class:`crane.Detector` and the export graph share."""
        return self.head(self.encode_image(images), text)
