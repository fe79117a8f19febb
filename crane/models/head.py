"""From normalised features to anomaly maps and image scores (no learnable parts).

``T``: normalised text features ``1 x 2 x E`` or ``B x 2 x E`` (normal, anomalous).
Token sets: normalised patch tokens ``B x L x E`` with ``L = g*g``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .smoothing import smooth

TAU = 0.07


def patch_logits(tokens: torch.Tensor, text: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """``tokens @ T^T / tau``: ``B x L x 2``."""
    return tokens @ text.transpose(-1, -2) / tau


def _to_grid(x: torch.Tensor) -> torch.Tensor:
    """``B x L x C`` -> ``B x C x g x g``."""
    b, n, c = x.shape
    g = round(n ** 0.5)
    return x.transpose(1, 2).reshape(b, c, g, g)


def upsample(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """``B x L x C`` -> ``B x C x size x size`` (bilinear ``align_corners=False`` at test, nearest in training)."""
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(_to_grid(x), size=(size, size), mode=mode, **kwargs)


def anomaly_probability_maps(logits: Sequence[torch.Tensor], size: int, soft_mean: bool,
                             mode: str = "bilinear") -> torch.Tensor:
    """Per-pixel [normal, anomalous] probabilities ``B x 2 x size x size``.

    ``soft_mean``: softmax each token set, upsample, average; otherwise upsample the
    logits, average, softmax.
    """
    if soft_mean:
        return torch.stack([upsample(p.softmax(-1), size, mode) for p in logits]).mean(0)
    return torch.stack([upsample(p, size, mode) for p in logits]).mean(0).softmax(1)


def image_scores(tokens: Sequence[torch.Tensor], logits: Sequence[torch.Tensor], image_embedding: torch.Tensor,
                 text: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Score-based pooling: ``B`` anomaly probabilities.

    ``w = softmax(mean_l P_l)[..., 1]``; ``c = normalize(sum_L mean_l(tokens_l) * w)``;
    ``z = normalize(0.5 c + 0.5 image_embedding)``; score = ``softmax(z T^T / tau)[1]``.
    All token sets share one grid (with DINO v1 or SAM, the VFM's: see ``CraneModel.image_parts``).
    """
    w = torch.stack(logits).mean(0).softmax(-1)[..., 1:]
    c = F.normalize((torch.stack(tokens).mean(0) * w).sum(1), dim=-1)
    z = F.normalize(0.5 * c + 0.5 * image_embedding, dim=-1)
    return (z[:, None, :] @ text.transpose(-1, -2) / tau)[:, 0].softmax(-1)[:, 1]


def smooth_maps(maps: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """The published ``scipy.ndimage.gaussian_filter`` per map (``reflect`` border): ``N x S x S`` float32."""
    maps = np.asarray(maps, dtype=np.float32)
    return smooth(torch.from_numpy(maps.copy()), sigma).numpy()
