"""The Crane / Crane+ model: frozen CLIP (+ VFM) with E-Attn, D-Attn and learnable prompts."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .head import TAU, anomaly_probability_maps, image_scores, patch_logits
from .prompts import PromptLearner, encode_text
from .vfm import VisionFoundationModel, dattn_attention
from .vision import CraneVisionEncoder


@dataclass
class CraneConfig:
    """Test-time options, named as the original flags.

    ``layer_aliasing`` reproduces quirk 1 (all E-Attn layers return the last refined
    stream); ``dattn_batch_mean`` quirk 3 (D-Attn mean over the whole batch).
    """

    features_list: tuple[int, ...] = (24,)
    dino_model: str = "none"
    soft_mean: bool = False
    image_size: int = 518
    attn_type: str = "qq+kk+vv"
    sigma: float = 4.0
    both_eattn_dattn: bool = True
    use_scorebase_pooling: bool = True
    dattn_batch_mean: bool = False
    layer_aliasing: bool = True
    eattn_layers: int = 19
    n_ctx: int = 12
    t_n_ctx: int = 4
    depth: int = 9
    dattn_gamma: float = 3.0

    @classmethod
    def from_options(cls, options: Any) -> "CraneConfig":
        """The config of any object whose attributes are named as the flags (parsed arguments,
        ``EvalOptions``, ``TrainOptions``); fields it lacks keep their defaults."""
        values = {f.name: getattr(options, f.name) for f in fields(cls) if hasattr(options, f.name)}
        if "features_list" in values:
            values["features_list"] = tuple(int(i) for i in values["features_list"])
        return cls(**values)


@dataclass
class ImageFeatures:
    """Normalised image embedding ``B x E`` and token sets, each ``B x L x E``."""

    image_embedding: torch.Tensor
    patch_tokens: list[torch.Tensor]


class CraneModel(nn.Module):
    """Crane (``vfm=None``) or Crane+ (with a VFM for D-Attn).

    Only ``prompt_learner`` has trainable parameters.
    """

    def __init__(self, clip: nn.Module, tokenizer, config: CraneConfig,
                 vfm: Optional[VisionFoundationModel] = None) -> None:
        super().__init__()
        self.config = config
        self.clip = clip.eval().requires_grad_(False)
        self.vision = CraneVisionEncoder(clip.visual, config.attn_type, config.eattn_layers, config.layer_aliasing)
        self.vfm = vfm
        self.prompt_learner = PromptLearner(clip.token_embedding, tokenizer, config.n_ctx, config.t_n_ctx, config.depth)
        depth = self.vision.depth
        bad = [i for i in config.features_list if not 1 <= i <= depth]
        if bad:
            raise ValueError(f"features_list {bad} outside the vision tower's blocks 1..{depth}")
        self.dattn_layer = depth if vfm is not None and depth in config.features_list else None

    def text_features(self, image_embedding: Optional[torch.Tensor] = None, image_token_type: str = "pad_suffix"
                      ) -> torch.Tensor:
        """Normalised [normal, anomalous] text features: ``1 x 2 x E``, or ``B x 2 x E`` when
        conditioned on normalised image embeddings ``B x E``."""
        prompts, ids = self.prompt_learner(image_embedding, image_token_type)
        feats = encode_text(self.clip, prompts, ids, self.prompt_learner.compound_prompts_text).float()
        feats = torch.stack(feats.chunk(2, dim=0), dim=1)
        return F.normalize(feats, dim=-1)

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """``B x 3 x S x S`` CLIP-normalised images -> normalised embedding and token sets."""
        cfg = self.config
        xo, tokens, t = self.vision.forward_features(images, cfg.features_list, self.dattn_layer)
        embedding = self.vision.project(xo[:, 0])
        sets: list[torch.Tensor] = []
        projected: dict[int, torch.Tensor] = {}  # aliased layers (quirk 1) share one stream: project it once
        for layer in cfg.features_list:
            if layer == self.dattn_layer:
                feats = self.vfm(images)
                attn = dattn_attention(feats, self.vfm.beta, cfg.dattn_gamma, cfg.dattn_batch_mean)
                sets.append(self.vision.project(self.vision.dattn_tokens(t, layer, attn, tuple(feats.shape[-2:]))))
                if not cfg.both_eattn_dattn:
                    continue
            stream = tokens[layer]
            if id(stream) not in projected:
                projected[id(stream)] = self.vision.project(stream[:, 1:])
            sets.append(projected[id(stream)])
        return ImageFeatures(F.normalize(embedding.float(), dim=-1), [F.normalize(s.float(), dim=-1) for s in sets])

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
