"""Vision foundation models for D-Attn (Crane+): DINOv2 (S/B/L, with and without registers), DINOv3
(S/B/L), DINO v1 and SAM via timm.

Each VFM takes the CLIP-normalised image, un-normalises it to [0, 1] (clamped),
re-normalises it with its own statistics and returns dense features
``B x C x H x W``. :func:`dattn_attention` turns them into the D-Attn matrix.

The published code builds DINOv2 and DINO v1 with ``torch.hub`` (Meta's own
``vision_transformer.py``). Those models keep the checkpoint's position embedding
(a 37 x 37 grid for DINOv2 at 518, 28 x 28 for DINO v1 at 224) and resample it at
every forward pass for the input's grid, each with its own rule
(:class:`PosEmbedRule`). We keep the checkpoint's grid too and resample with the
same rule at forward time, so the features equal the hub models' at any input
size, and one VFM serves every size.

DINOv3 has no position embedding to resample: its RoPE (Meta's ``RopePositionEmbedding``,
``facebookresearch/dinov3``) places each patch at its centre ``(i + 0.5) / g`` mapped to
``[-1, 1]`` per axis (``normalize_coords="separate"``) and rotates query and key of the patch
tokens (not the class and register tokens) by ``2 pi coord / period``, periods
``100 ** (2 j / (D_head / 2))``; the coordinate shift / jitter / rescale act only in training.
So at a non-native grid the positions are the same fractions of the image, recomputed for that
grid, with nothing interpolated. timm's ``RotaryEmbeddingDinoV3`` (``rope_type="dinov3"``)
computes the same; its periods are made in float32 by the formula, and Meta's checkpoint stores
them too, so :func:`load_vfm` copies the stored periods (what Meta's model uses) when the file has
them. Meta's patch embedding is a stride-16 convolution, which drops the pixels past the last
whole patch (518 px -> 32 x 32 patches): ``floor_input``. ``tests/test_backbones.py`` checks the
rotation against a from-definition reference at non-native grids.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
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
class PosEmbedRule:
    """How a hub ViT resizes its ``M x M`` patch position embedding to another grid.

    Bicubic (``align_corners=False``) in float32. With ``offset == 0`` the output size
    is given (``size=grid``); otherwise the scale factor ``(g + offset) / M`` is, which
    also moves the sampling positions (PyTorch samples at ``(i + 0.5) / scale - 0.5``).
    ``antialias=True`` uses PyTorch's anti-aliased bicubic kernel, whose cubic
    coefficient is -0.5 instead of -0.75, so it differs even when upsampling.
    """

    antialias: bool
    offset: float


# torch.hub "dinov2_vitb14_reg": interpolate_antialias=True, interpolate_offset=0.0 (output size given).
DINOV2_REG_RULE = PosEmbedRule(antialias=True, offset=0.0)
# DINO v1 (facebookresearch/dino): scale factor (g + 0.1) / M, no antialias.
DINO_V1_RULE = PosEmbedRule(antialias=False, offset=0.1)


@dataclass(frozen=True)
class VfmSpec:
    """How to build one VFM: timm architecture, Meta's file name, input size rule, centring factor.

    ``pos_rule`` is the hub model's position-embedding resampling (None: SAM, which
    always runs at its native 1024 x 1024). ``floor_input``: the hub patch embedding
    drops the pixels beyond the last whole patch (DINO v1); otherwise the input side
    must be a multiple of the patch size (DINOv2 asserts it). ``norm_eps``: the block
    LayerNorm epsilon of the hub model where timm's default differs (SAM: 1e-6;
    ``samvit_base_patch16`` builds its blocks with 1e-5).
    """

    timm_name: str
    hf_repo: str
    meta_file: str
    patch: int
    beta: float = 1.2
    fixed_input: Optional[int] = None  # SAM always runs at 1024x1024
    pos_rule: Optional[PosEmbedRule] = None
    floor_input: bool = False
    norm_eps: Optional[float] = None
    rope: bool = False  # DINOv3: RoPE positions (no embedding to resample), timm's Eva


def _dinov2(size: str, timm_size: str, reg: bool) -> VfmSpec:
    """A DINOv2 of the torch hub: with registers its position rule is antialiased with the output size
    given; without, the hub uses offset 0.1 and no antialias (``interpolate_offset=0.1``), as DINO v1."""
    tag = "_reg4" if reg else ""
    return VfmSpec(f"vit_{timm_size}_patch14{tag}_dinov2", f"timm/vit_{timm_size}_patch14{tag}_dinov2.lvd142m",
                   f"dinov2_vit{size}14{tag}_pretrain.pth", patch=14, pos_rule=DINOV2_REG_RULE if reg else DINO_V1_RULE)


def _dinov3(size: str, timm_size: str) -> VfmSpec:
    return VfmSpec(f"vit_{timm_size}_patch16_dinov3", f"timm/vit_{timm_size}_patch16_dinov3.lvd1689m",
                   f"dinov3_vit{size}16_pretrain_lvd1689m*.pth", patch=16, floor_input=True, rope=True)


VFMS: dict[str, VfmSpec] = {
    "dinov2": _dinov2("b", "base", reg=True),
    "dinov2_vits14": _dinov2("s", "small", reg=False),
    "dinov2_vits14_reg": _dinov2("s", "small", reg=True),
    "dinov2_vitb14": _dinov2("b", "base", reg=False),
    "dinov2_vitb14_reg": _dinov2("b", "base", reg=True),
    "dinov2_vitl14": _dinov2("l", "large", reg=False),
    "dinov2_vitl14_reg": _dinov2("l", "large", reg=True),
    "dinov3_vits16": _dinov3("s", "small"),
    "dinov3_vitb16": _dinov3("b", "base"),
    "dinov3_vitl16": _dinov3("l", "large"),
    "dino": VfmSpec("vit_base_patch8_224", "timm/vit_base_patch8_224.dino", "dino_vitbase8_pretrain.pth", patch=8,
                    pos_rule=DINO_V1_RULE, floor_input=True),
    "sam": VfmSpec("samvit_base_patch16", "timm/samvit_base_patch16.sa1b", "sam_vit_b_01ec64.pth", patch=16,
                   beta=1.08, fixed_input=1024, norm_eps=1e-6),
}


def resample_patch_pos_embed(pos: torch.Tensor, grid: tuple[int, int], rule: PosEmbedRule) -> torch.Tensor:
    """Patch position embedding ``1 x M*M x C`` -> ``1 x gh*gw x C`` by the hub rule ``rule``.

    The native grid (``grid == (M, M)``) is returned unchanged, as the hub models do.
    """
    native = math.isqrt(pos.shape[1])
    if native * native != pos.shape[1]:
        raise ValueError(f"position embedding of {pos.shape[1]} patches is not a square grid")
    if tuple(grid) == (native, native):
        return pos
    planes = pos.float().reshape(1, native, native, -1).permute(0, 3, 1, 2)
    if rule.offset:
        size = dict(scale_factor=((grid[0] + rule.offset) / native, (grid[1] + rule.offset) / native))
    else:
        size = dict(size=tuple(grid))
    planes = F.interpolate(planes, mode="bicubic", antialias=rule.antialias, **size)
    if tuple(planes.shape[-2:]) != tuple(grid):
        raise ValueError(f"resampling the position embedding gave {tuple(planes.shape[-2:])}, not {tuple(grid)}")
    return planes.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)


def resolve_vfm_weights(name: str) -> str:
    """The cached weights file of VFM ``name``; ``WeightsNotFoundError`` (what to fetch, where) when absent."""
    if name not in VFMS:
        raise ValueError(f"unknown dino_model {name!r}; choose none, {', '.join(VFMS)}")
    return _resolve_file(name, VFMS[name])


def _resolve_file(name: str, spec: VfmSpec) -> str:
    """Find Meta's checkpoint in the torch hub cache or timm's in the HF cache; fail fast otherwise."""
    local = torch_hub_checkpoint(spec.meta_file)
    found = sorted(local.parent.glob(local.name)) if "*" in local.name and local.parent.is_dir() else []
    if local.is_file() or found:
        return str(found[-1] if found else local)
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
        return self._vit_features(x)

    def _vit_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last block's tokens after the final norm, patch tokens only: ``B x C x gh x gw``.

        As the hub models' ``get_intermediate_layers(x, n=1, reshape=True, norm=True)``
        (DINO v1's takes the last block with its norm too). Tokens are
        ``[cls, registers..., patches]``; the class token carries its own position
        (DINOv2: folded into ``cls_token`` by timm's checkpoint filter, as the hub adds
        it before inserting the registers, which get none).
        """
        m, patch = self.model, self.model.patch_embed.patch_size
        if self.spec.floor_input:  # a stride-p convolution ignores the pixels past the last whole patch
            x = x[..., : x.shape[-2] // patch[0] * patch[0], : x.shape[-1] // patch[1] * patch[1]]
        if self.spec.rope:  # DINOv3: timm's Eva places the RoPE for this grid (module docstring)
            gh, gw = x.shape[-2] // patch[0], x.shape[-1] // patch[1]
            tokens = m.forward_features(x)
            return tokens[:, m.num_prefix_tokens:].reshape(x.shape[0], gh, gw, -1).permute(0, 3, 1, 2)
        patches = m.patch_embed(x)  # B x gh x gw x C (timm's dynamic_img_size layout)
        b, gh, gw, c = patches.shape
        prefix = 0 if m.no_embed_class else m.num_prefix_tokens  # position rows before the patch rows
        pos = resample_patch_pos_embed(m.pos_embed[:, prefix:], (gh, gw), self.spec.pos_rule)
        front = [m.cls_token.expand(b, -1, -1)]
        if prefix:
            front[0] = front[0] + m.pos_embed[:, :prefix]
        if m.reg_token is not None:
            front.append(m.reg_token.expand(b, -1, -1))
        tokens = torch.cat(front + [patches.reshape(b, gh * gw, c) + pos], dim=1)
        tokens = m.norm(m.blocks(m.norm_pre(tokens)))
        return tokens[:, m.num_prefix_tokens:].reshape(b, gh, gw, c).permute(0, 3, 1, 2)


def load_vfm(name: str, weights: VfmWeights = None, image_size: int = 518) -> VisionFoundationModel:
    """Build the frozen VFM ``name`` (a key of :data:`VFMS`: ``dinov2``, ``dinov3_vitb16``, ``dino``, ``sam``, ...)
    for input size ``image_size``.

    ``weights``: ``None`` (look in the torch hub and Hugging Face caches), a file
    (Meta's checkpoint or a timm state dict), an in-memory state dict, or ``"synthetic"``
    (timm's random initialisation, seed 0: meaningless features, for offline pipeline
    runs); timm's checkpoint filter converts Meta's layout. DINOv2 and DINO v1 keep the
    weights' own position-embedding grid (``"synthetic"``: the native one) and resample it
    per input by the hub rule (module docstring), so ``image_size`` does not shape the
    model (DINOv2 inputs must be a multiple of 14: timm's patch embedding asserts it at
    forward time, as the hub's does).
    """
    import timm

    if name not in VFMS:
        raise ValueError(f"unknown dino_model {name!r}; choose none, {', '.join(VFMS)}")
    spec = VFMS[name]
    kwargs = {} if spec.norm_eps is None else dict(norm_layer=partial(nn.LayerNorm, eps=spec.norm_eps))
    if not spec.fixed_input:
        kwargs.update(dynamic_img_size=True)
    if isinstance(weights, str) and weights == "synthetic":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs)
        return VisionFoundationModel(name, model.eval().requires_grad_(False), spec)
    sd = _load_state_dict(name, spec, weights)
    periods = sd.get("rope_embed.periods") if spec.rope else None
    if not spec.fixed_input and not spec.rope:
        kwargs.update(img_size=_weights_grid(sd) * spec.patch)
    # No random initialisation: every tensor comes from the weights (DINOv3's RoPE periods are a
    # non-persistent buffer the model makes itself, so it is built on the CPU)
    with torch.device("cpu" if spec.rope else "meta"):
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
    copy = isinstance(weights, Mapping)  # never share storage with the caller's tensors
    model.load_state_dict({k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=copy)
                           for k, v in sd.items()}, strict=False, assign=True)
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{name}: {spec.timm_name} has tensors the weights do not provide: {left[:5]}")
    if periods is not None:  # Meta's model rotates by the periods its checkpoint stores
        model.rope.periods.copy_(periods.float())
    return VisionFoundationModel(name, model.eval().requires_grad_(False), spec)


def _weights_grid(sd: Mapping[str, torch.Tensor]) -> int:
    """Side of the square patch grid of the weights' position embedding.

    Its rows are the patches (timm's DINOv2 layout) or a class row plus the patches
    (Meta's layouts, timm's DINO v1); ``n`` and ``n - 1`` are never both squares for n > 2.
    """
    sd = sd.get("model", sd)
    rows = sd.get("state_dict", sd)["pos_embed"].shape[1]  # the wrappers timm's checkpoint filter unpacks
    for patches in (rows, rows - 1):
        side = math.isqrt(patches)
        if side > 1 and side * side == patches:
            return side
    raise ValueError(f"the VFM weights' pos_embed has {rows} rows, not a square patch grid (+ class row)")


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
