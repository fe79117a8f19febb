"""Vision foundation models for D-Attn (Crane+): DINOv2, DINO v1 and SAM via timm.

Each VFM takes the CLIP-normalised image, un-normalises it to [0, 1] (clamped),
re-normalises it with its own statistics and returns dense features
``B x C x H x W``. :func:`dattn_attention` turns them into the D-Attn matrix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data.image import OPENAI_MEAN, OPENAI_STD
from .clip_loader import read_state_dict
from .errors import WeightsNotFoundError
from .hub import find_in_hf_cache, torch_hub_checkpoint

VfmWeights = Union[None, str, os.PathLike, Mapping[str, torch.Tensor]]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VfmSpec:
    """How to build one VFM: timm architecture, Meta's file name, input size rule, centring factor."""

    timm_name: str
    hf_repo: str
    meta_file: str
    beta: float = 1.2
    fixed_input: Optional[int] = None  # SAM always runs at 1024x1024


VFMS: dict[str, VfmSpec] = {
    "dinov2": VfmSpec("vit_base_patch14_reg4_dinov2", "timm/vit_base_patch14_reg4_dinov2.lvd142m",
                      "dinov2_vitb14_reg4_pretrain.pth"),
    "dino": VfmSpec("vit_base_patch8_224", "timm/vit_base_patch8_224.dino", "dino_vitbase8_pretrain.pth"),
    "sam": VfmSpec("samvit_base_patch16", "timm/samvit_base_patch16.sa1b", "sam_vit_b_01ec64.pth",
                   beta=1.08, fixed_input=1024),
}


def resolve_vfm_weights(name: str) -> str:
    """The cached weights file of VFM ``name``; ``WeightsNotFoundError`` (what to fetch, where) when absent."""
    if name not in VFMS:
        raise ValueError(f"unknown dino_model {name!r}; choose none, {', '.join(VFMS)}")
    return _resolve_file(name, VFMS[name])


def _resolve_file(name: str, spec: VfmSpec) -> str:
    """Find Meta's checkpoint in the torch hub cache or timm's in the HF cache; fail fast otherwise."""
    local = torch_hub_checkpoint(spec.meta_file)
    if local.is_file():
        return str(local)
    cached = find_in_hf_cache(spec.hf_repo, ("model.safetensors", "pytorch_model.bin"))
    if cached:
        return cached
    raise WeightsNotFoundError(
        f"the {name} weights ({spec.meta_file}) were not found.\n"
        f"Put Meta's `{spec.meta_file}` in {local.parent}/ (or run `bash scripts/download_weights.sh` "
        f"on a machine with internet), or pass `--dino_weights /path/to/{spec.meta_file}` "
        f"(Python: `dino_weights=PATH`)."
    )


def _load_state_dict(name: str, spec: VfmSpec, weights: VfmWeights) -> dict[str, torch.Tensor]:
    if isinstance(weights, Mapping):
        return dict(weights)
    if weights is None:
        path = _resolve_file(name, spec)
    else:
        path = os.path.expanduser(os.fspath(weights))
        if not Path(path).is_file():
            raise WeightsNotFoundError(f"{name} weights file not found: {path} (flag --dino_weights)")
    return read_state_dict(path)


class VisionFoundationModel(nn.Module):
    """A frozen timm backbone producing dense features ``B x C x H x W`` from CLIP-normalised input."""

    def __init__(self, name: str, model: nn.Module, spec: VfmSpec) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.spec = spec
        self.register_buffer("clip_mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)
        mean, std = IMAGENET_MEAN, IMAGENET_STD  # SAM's pixel statistics are the same values on a 0..255 scale
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def beta(self) -> float:
        """The centring factor of the D-Attn similarity (1.2; 1.08 for SAM)."""
        return self.spec.beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` CLIP-normalised image -> ``B x C x H x W`` features."""
        x = (x * self.clip_std + self.clip_mean).clamp(0, 1)
        x = (x - self.mean) / self.std
        if self.spec.fixed_input is not None:
            x = F.interpolate(x, size=(self.spec.fixed_input,) * 2, mode="bilinear", align_corners=False)
            return self.model.forward_features(x)
        return self.model.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]


def load_vfm(name: str, weights: VfmWeights = None, image_size: int = 518) -> VisionFoundationModel:
    """Build the frozen VFM ``name`` (``dinov2``, ``dino`` or ``sam``) for input size ``image_size``.

    ``weights``: ``None`` (look in the torch hub and Hugging Face caches), a file
    (Meta's checkpoint or a timm state dict), an in-memory state dict, or ``"synthetic"``
    (timm's random initialisation, seed 0: meaningless features, for offline pipeline
    runs); timm's checkpoint filter converts Meta's layout and resizes position embeddings.
    """
    import timm

    if name not in VFMS:
        raise ValueError(f"unknown dino_model {name!r}; choose none, {', '.join(VFMS)}")
    spec = VFMS[name]
    kwargs = {} if spec.fixed_input else dict(img_size=image_size, dynamic_img_size=True)
    if isinstance(weights, str) and weights == "synthetic":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs)
        return VisionFoundationModel(name, model.eval().requires_grad_(False), spec)
    sd = _load_state_dict(name, spec, weights)
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs)
    filter_fn = getattr(__import__(type(model).__module__, fromlist=["checkpoint_filter_fn"]), "checkpoint_filter_fn")
    sd = filter_fn(sd, model)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith("head")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{name} weights do not fit {spec.timm_name}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatches {shapes[:5]}")
    model.load_state_dict(sd, strict=False)
    return VisionFoundationModel(name, model.eval().requires_grad_(False), spec)


def dattn_attention(features: torch.Tensor, beta: float = 1.2, gamma: float = 3.0, batch_mean: bool = False) -> torch.Tensor:
    """D-Attn matrix ``A_d`` (``B x HW x HW``) from VFM features ``B x C x H x W``.

    ``Sim = f^T f`` of channel-normalised features; ``M = (Sim - beta * mean(Sim)) * gamma``;
    negative entries are masked; softmax over the last axis. The mean is per image
    unless ``batch_mean`` (the published batch-wide mean, quirk 3).
    """
    f = F.normalize(features.float().flatten(2), dim=1)
    sim = torch.bmm(f.transpose(1, 2), f)
    mean = sim.mean() if batch_mean else sim.mean(dim=(1, 2), keepdim=True)
    m = (sim - beta * mean) * gamma
    negative = m < 0
    # A row with every entry negative (an image whose mean similarity exceeds 1 / beta) would be
    # all -inf and give NaN, as in the published code; such rows keep their plain softmax instead.
    # Rows the published code handles are unchanged.
    m = m.masked_fill(negative & ~negative.all(dim=-1, keepdim=True), float("-inf"))
    return m.softmax(dim=-1)
