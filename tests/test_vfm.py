"""VFM features as the torch.hub models compute them (DINOv2 with registers, DINO v1, SAM).

The reference below re-derives the hub models' position-embedding resampling from its
definition (separable bicubic weights in float64, written out here, not PyTorch's
kernel) and prepares the tokens the way the hub ``prepare_tokens`` does; the
transformer blocks are the loaded model's own, so what is compared is the embedding
path: layouts, class/register tokens and the resampling rule at each size.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from crane.data.image import OPENAI_MEAN, OPENAI_STD
from crane.models.vfm import (DINO_V1_RULE, DINOV2_REG_RULE, IMAGENET_MEAN, IMAGENET_STD, PosEmbedRule,
                              load_vfm, resample_patch_pos_embed)


# --------------------------------------------------------------- reference resampling


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with coefficient ``a``."""
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, a * (((x - 5) * x + 8) * x - 4), 0.0))


def _bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """``n_out x n_in`` weights of plain bicubic (a = -0.75, edge pixels repeated).

    Output ``i`` samples input position ``(i + 0.5) / scale - 0.5`` (``align_corners=False``),
    computed in float32 as PyTorch's float32 kernel does (the rest in float64).
    """
    w = np.zeros((n_out, n_in))
    step = np.float32(1.0 / scale)
    for i in range(n_out):
        src = step * np.float32(i + 0.5) - np.float32(0.5)
        base = math.floor(src)
        for k, tap in enumerate(range(base - 1, base + 3)):
            w[i, min(max(tap, 0), n_in - 1)] += _cubic(np.array(float(src - np.float32(base)) + 1 - k), -0.75)
    return w


def _antialiased_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``n_out x n_in`` weights of anti-aliased bicubic to a given size (the PIL-style filter).

    The kernel (a = -0.5) is stretched by the reduction factor when downsampling; the
    taps are the input pixels whose centres lie within its support, normalised to sum 1.
    Centres in float32, as in PyTorch's float32 kernel.
    """
    ratio = np.float32(n_in / n_out)
    stretch = max(ratio, np.float32(1.0))
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = ratio * np.float32(i + 0.5)
        lo = max(int(centre - 2 * stretch + np.float32(0.5)), 0)
        hi = min(int(centre + 2 * stretch + np.float32(0.5)), n_in)
        taps = np.arange(lo, hi, dtype=np.float32)
        k = _cubic(((taps - centre + np.float32(0.5)) / stretch).astype(np.float64), -0.5)
        w[i, lo:hi] = k / k.sum()
    return w


def reference_resample(pos: torch.Tensor, grid: tuple[int, int], rule: PosEmbedRule) -> torch.Tensor:
    """The hub rule from its definition: ``1 x M*M x C`` -> ``1 x gh*gw x C`` (float64 weights)."""
    m = math.isqrt(pos.shape[1])
    if tuple(grid) == (m, m):
        return pos
    if rule.antialias:
        assert rule.offset == 0  # the only anti-aliased rule in use: output size given
        rows, cols = (_antialiased_bicubic_matrix(m, g) for g in grid)
    else:
        rows, cols = (_bicubic_matrix(m, g, (g + rule.offset) / m) for g in grid)
    planes = pos[0].double().numpy().reshape(m, m, -1)
    out = np.einsum("ip,jq,pqc->ijc", rows, cols, planes)
    return torch.from_numpy(out.reshape(1, grid[0] * grid[1], -1)).to(pos.dtype)


@pytest.mark.parametrize("rule,native,grids", [
    (DINOV2_REG_RULE, 37, [(8, 8), (10, 10), (16, 16), (24, 24), (37, 37), (40, 40), (8, 12)]),
    (DINO_V1_RULE, 28, [(14, 14), (17, 17), (28, 28), (42, 42), (64, 64), (17, 21)]),
])
def test_pos_embed_resampling_is_the_hub_rule(rule, native, grids):
    pos = torch.randn(1, native * native, 16, generator=torch.Generator().manual_seed(native))
    for grid in grids:
        ours = resample_patch_pos_embed(pos, grid, rule)
        assert ours.shape == (1, grid[0] * grid[1], 16) and ours.dtype == pos.dtype
        # float32 weights and sums in PyTorch's kernel: about 1e-6 of the values (|pos| < 5 here)
        torch.testing.assert_close(ours, reference_resample(pos, grid, rule), atol=5e-6, rtol=0, msg=str(grid))
    assert resample_patch_pos_embed(pos, (native, native), rule) is pos  # the native grid is untouched


def test_the_two_rules_differ():
    """Guard for the test above: anti-aliasing, the offset and the kernel each change the result."""
    pos = torch.randn(1, 28 * 28, 8, generator=torch.Generator().manual_seed(0))
    for grid in [(14, 14), (42, 42)]:
        aa = resample_patch_pos_embed(pos, grid, PosEmbedRule(antialias=True, offset=0.0))
        v1 = resample_patch_pos_embed(pos, grid, DINO_V1_RULE)
        plain = resample_patch_pos_embed(pos, grid, PosEmbedRule(antialias=False, offset=0.0))
        assert (aa - v1).abs().max() > 1e-2 and (plain - v1).abs().max() > 1e-3


# -------------------------------------------------------------------- hub-like models


def _hub_layout_weights(name: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in the layout of Meta's hub checkpoints.

    DINOv2 with registers: ``pos_embed`` 1 x (1 + 37*37) x 768 (class row first),
    ``cls_token``, ``register_tokens``, ``mask_token``, LayerScale ``gamma``s; DINO v1
    ViT-B/8: ``pos_embed`` 1 x (1 + 28*28) x 768, no registers.
    """
    import timm

    timm_name = {"dinov2": "vit_base_patch14_reg4_dinov2", "dino": "vit_base_patch8_224"}[name]
    with torch.device("meta"):  # shapes only, no initialisation
        shapes = {k: v.shape for k, v in timm.create_model(timm_name, pretrained=False, num_classes=0).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)

    def draw(shape, std, mean=0.0):
        return mean + std * torch.randn(shape, generator=gen)

    sd = {}
    for k, shape in shapes.items():
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            sd[k] = draw(shape, 0.1, 1.0)
        elif ".ls" in k:  # LayerScale far from its 1e-5 init, so the blocks matter
            sd[k] = draw(shape, 0.05, 0.2)
        elif k.endswith("weight"):  # linear and patch-embedding kernels: unit gain
            sd[k] = draw(shape, shape[1:].numel() ** -0.5)
        elif k in ("cls_token", "reg_token", "pos_embed"):  # embeddings large enough to matter
            sd[k] = draw(shape, 0.3)
        else:
            sd[k] = draw(shape, 0.02)
    if name == "dino":
        return sd  # timm's vit_base_patch8_224 has Meta's DINO v1 key layout
    meta = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed")}  # same block keys
    meta["register_tokens"] = sd["reg_token"]
    meta["pos_embed"] = torch.cat([draw((1, 1, 768), 0.3), sd["pos_embed"]], dim=1)
    meta["mask_token"] = torch.zeros(1, 768)
    return meta


def _hub_features(model: nn.Module, hub_sd: dict[str, torch.Tensor], x: torch.Tensor, name: str) -> torch.Tensor:
    """Hub ``prepare_tokens`` + the model's blocks + final norm, patch tokens as ``B x C x gh x gw``.

    Hub order: patch embedding (a stride-p convolution, so pixels past the last whole
    patch are ignored), ``[cls, patches] + [pos_cls, resampled pos_patches]``, then (DINOv2)
    the registers inserted after the class token without any position.
    """
    weight, bias = hub_sd["patch_embed.proj.weight"], hub_sd["patch_embed.proj.bias"]
    patch = weight.shape[-1]
    planes = nn.functional.conv2d(x, weight, bias, stride=patch)
    b, c, gh, gw = planes.shape
    tokens = torch.cat([hub_sd["cls_token"].expand(b, -1, -1), planes.flatten(2).transpose(1, 2)], dim=1)
    pos = hub_sd["pos_embed"]
    rule = DINOV2_REG_RULE if name == "dinov2" else DINO_V1_RULE
    tokens = tokens + torch.cat([pos[:, :1], reference_resample(pos[:, 1:], (gh, gw), rule)], dim=1)
    if "register_tokens" in hub_sd:
        tokens = torch.cat([tokens[:, :1], hub_sd["register_tokens"].expand(b, -1, -1), tokens[:, 1:]], dim=1)
    tokens = model.norm(model.blocks(tokens))
    return tokens[:, -gh * gw:].transpose(1, 2).reshape(b, c, gh, gw)


def _images(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-normalised input and the ImageNet-normalised pixels the hub model sees."""
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    clip = (pixels - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return clip, (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", ["dinov2", "dino"])
def test_features_equal_the_hub_model(name):
    """DINOv2 (native 37 x 37) and DINO v1 (native 28 x 28) at 112 and 140 px: the hub's features.

    One VFM, from Meta-layout weights, serves both sizes (the weights keep their native
    grid); DINO v1 at 140 also drops the pixels past the last whole patch (140 = 17 * 8 + 4).
    """
    hub_sd = _hub_layout_weights(name, seed=3)
    vfm = load_vfm(name, hub_sd, image_size=112)
    native = 37 if name == "dinov2" else 28
    assert vfm.model.pos_embed.shape[1] == native * native + (name == "dino")
    for size in (112, 140):
        clip, hub_input = _images(size, seed=size)
        with torch.no_grad():
            ours = vfm(clip)
            expected = _hub_features(vfm.model, hub_sd, hub_input, name)
        patch = 14 if name == "dinov2" else 8
        assert ours.shape == (1, 768, size // patch, size // patch)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0, msg=f"{name} at {size}")


def test_sam_blocks_use_the_hub_layer_norm_epsilon():
    """segment_anything builds SAM's ViT with LayerNorm(eps=1e-6); timm's samvit defaults to 1e-5."""
    import timm

    sd = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0).state_dict()
    vfm = load_vfm("sam", sd, image_size=112)
    norms = [m for m in vfm.model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) >= 24 and all(m.eps == 1e-6 for m in norms)
