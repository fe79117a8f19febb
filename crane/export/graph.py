"""The module that gets exported: preprocessed images in, image scores and smoothed maps out."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..models.crane import CraneModel
from ..models.memory import ReferenceMemory
from ..models.smoothing import gaussian_smooth


class InferenceGraph(nn.Module):
    """``B x 3 x S x S`` CLIP-normalised images -> (scores ``B``, smoothed anomaly maps ``B x S x S``).

    The whole test-time path of :class:`crane.Detector` in one module: E-Attn (and D-Attn
    with its VFM for Crane+), the fixed text features as a constant buffer, score pooling,
    the bilinear upsampling and the Gaussian smoothing (:func:`gaussian_smooth`, equal to
    the scipy filter ``Detector.predict`` applies).

    With a reference ``memory`` (few-shot, ``docs/method.md``) its banks are constant buffers too, and the
    zero-shot scores and unsmoothed maps are mixed with the few-shot ones (:meth:`ReferenceMemory.fuse`:
    nearest neighbour as chunked ``MatMul`` + ``ReduceMax`` over the memory) before the smoothing, as
    :meth:`crane.Detector.forward` does. The graph keeps its own copy of the memory's module searching with
    torch (never faiss, whatever the memory's ``backend``); the banks are shared, not copied. Without a
    memory the module is the zero-shot one, unchanged.
    """

    def __init__(self, model: CraneModel, text_features: torch.Tensor,
                 memory: Optional[ReferenceMemory] = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("text_features", text_features.detach().float().clone())
        self.memory = None if memory is None else ReferenceMemory(memory.banks, memory.spec, backend="torch",
                                                                   chunk=memory.chunk, info=memory.info)

    @classmethod
    def from_detector(cls, detector) -> "InferenceGraph":
        """The graph of a :class:`crane.Detector` (its model, cached text features and reference memory, if
        any), on CPU."""
        return cls(detector.model, detector.text_features, detector.reference).cpu()

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.memory is None:
            scores, maps = self.model(images, self.text_features)
        else:
            features = self.model.encode_image(images)
            scores, maps = self.memory.fuse(features, *self.model.head(features, self.text_features))
        return scores, gaussian_smooth(maps, self.model.config.sigma)
