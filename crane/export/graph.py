"""The module that gets exported: preprocessed images in, image scores and smoothed maps out."""
from __future__ import annotations

import torch
from torch import nn

from ..models.crane import CraneModel
from ..models.smoothing import gaussian_smooth


class InferenceGraph(nn.Module):
    """``B x 3 x S x S`` CLIP-normalised images -> (scores ``B``, smoothed anomaly maps ``B x S x S``).

    The whole test-time path of :class:`crane.Detector` in one module: E-Attn (and D-Attn
    with its VFM for Crane+), the fixed text features as a constant buffer, score pooling,
    the bilinear upsampling and the Gaussian smoothing (:func:`gaussian_smooth`, equal to
    the scipy filter ``Detector.predict`` applies).
    """

    def __init__(self, model: CraneModel, text_features: torch.Tensor) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("text_features", text_features.detach().float().clone())

    @classmethod
    def from_detector(cls, detector) -> "InferenceGraph":
        """The graph of a :class:`crane.Detector` (its model and cached text features), on CPU."""
        return cls(detector.model, detector.text_features).cpu()

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = self.model(images, self.text_features)
        return scores, gaussian_smooth(maps, self.model.config.sigma)
