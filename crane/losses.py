"""Crane's training loss (docs/method.md §6), with the published arithmetic.

Per batch, with ``p_l = softmax(P_l)`` the per-pixel [normal, anomalous]
probabilities of token set ``l`` upsampled to ``S x S`` (nearest in training):

``2 * sum_l Focal(p_l, mask) + 2 * sum_l Dice((1 - p_l[0] + p_l[1]) / 2, mask) + 0.2 * CE(z T^T / 0.01, label)``

where ``z`` is the score-pooled image embedding (docs/method.md §5) and ``T``
the (image-conditioned) text features. Shapes: ``B`` images, ``L = g*g`` patches,
``E`` embedding width.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from crane.models.head import upsample

FOCAL_SMOOTH = 1e-5
IMAGE_TAU = 0.01
FOCAL_WEIGHT, DICE_WEIGHT, IMAGE_WEIGHT = 2.0, 2.0, 0.2


class LossTerms(NamedTuple):
    """Scalar tensors: ``focal`` and ``dice`` already weighted (x2), ``ce`` unweighted, and ``total``."""

    focal: torch.Tensor
    dice: torch.Tensor
    ce: torch.Tensor
    total: torch.Tensor


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = FOCAL_SMOOTH
               ) -> torch.Tensor:
    """The published focal loss, applied to probabilities (not logits).

    ``probs``: ``B x C x H x W`` class probabilities; ``target``: ``B x H x W`` class
    indices (a {0, 1} mask for two classes). The one-hot target is clamped to
    ``[smooth / (C - 1), 1 - smooth]``, ``pt = sum_c(onehot_c * p_c) + smooth`` and the
    loss ``-(1 - pt)^gamma * log(pt)`` is averaged over every pixel of the batch.
    """
    num_classes = probs.shape[1]
    onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).to(probs.dtype)
    onehot = onehot.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    pt = (onehot * probs).sum(1) + smooth
    return (-(1.0 - pt).pow(gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - mean_b (2 sum(p m) + 1) / (sum(p) + sum(m) + 1)`` for ``prob`` and ``target`` of shape ``B x ...``
    (items along the first axis)."""
    n = target.shape[0]
    p = prob.reshape(n, -1)
    m = target.reshape(n, -1).to(p.dtype)
    dice = (2.0 * (p * m).sum(1) + 1.0) / (p.sum(1) + m.sum(1) + 1.0)
    return 1.0 - dice.sum() / n


def pooled_image_embedding(tokens: Sequence[torch.Tensor], logits: Sequence[torch.Tensor],
                           image_embedding: torch.Tensor) -> torch.Tensor:
    """Score-based pooling (docs/method.md §5): ``z``, ``B x E``, normalised.

    ``w = softmax(mean_l P_l)[..., 1]``; ``c = normalize(sum_L mean_l(tokens_l) * w)``;
    ``z = normalize(0.5 c + 0.5 image_embedding)``. Gradients flow through ``w``.
    """
    w = torch.stack(list(logits)).mean(0).softmax(-1)[..., 1:]
    c = F.normalize((torch.stack(list(tokens)).mean(0) * w).sum(1), dim=-1)
    return F.normalize(0.5 * c + 0.5 * image_embedding, dim=-1)


def image_logits(tokens: Sequence[torch.Tensor], logits: Sequence[torch.Tensor], image_embedding: torch.Tensor,
                 text: torch.Tensor, use_scorebase_pooling: bool = True, tau: float = IMAGE_TAU) -> torch.Tensor:
    """Image logits of the training loss, ``B x 2``: ``z @ T^T / tau`` with ``z`` the pooled embedding
    (or the image embedding itself without score-based pooling); ``text`` is ``1 x 2 x E`` or ``B x 2 x E``."""
    z = pooled_image_embedding(tokens, logits, image_embedding) if use_scorebase_pooling else image_embedding
    return (z[:, None, :] @ text.transpose(-1, -2))[:, 0] / tau


def crane_loss(tokens: Sequence[torch.Tensor], logits: Sequence[torch.Tensor], image_embedding: torch.Tensor,
               text: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, interpolation: str = "nearest",
               use_scorebase_pooling: bool = True, dice_rows_of_single_image: bool = False) -> LossTerms:
    """The training loss of one batch.

    Published quirk (``dice_rows_of_single_image``): the published loop squeezes the mask batch,
    which drops the batch axis of a one-image batch; its Dice loss then takes the ``S`` rows of
    that image as ``S`` separate items (a mean of row-wise Dice terms). With the flag set and
    ``B == 1`` the Dice term is computed that way; otherwise per image.

    Args:
        tokens: normalised token sets, each ``B x L x E``.
        logits: their patch logits ``tokens @ T^T / 0.07``, each ``B x L x 2``.
        image_embedding: normalised CLIP image embeddings ``B x E``.
        text: normalised text features ``B x 2 x E`` (image-conditioned) or ``1 x 2 x E``.
        masks: ``B x S x S`` ground truth in {0, 1}; the maps are upsampled to ``S``.
        labels: ``B`` image labels (0 normal, 1 anomalous).
        interpolation: ``"nearest"`` (published training) or ``"bilinear"``.
    """
    size = masks.shape[-1]
    focal = dice = 0.0
    for lg in logits:
        probs = upsample(lg.softmax(-1), size, interpolation)  # B x 2 x S x S
        focal = focal + focal_loss(probs, masks)
        whole = (1.0 - probs[:, 0] + probs[:, 1]) / 2.0
        if dice_rows_of_single_image and masks.shape[0] == 1:
            dice = dice + dice_loss(whole[0], masks[0])  # S x S: each row an item
        else:
            dice = dice + dice_loss(whole, masks)
    ce = F.cross_entropy(image_logits(tokens, logits, image_embedding, text, use_scorebase_pooling), labels.long())
    focal, dice = FOCAL_WEIGHT * focal, DICE_WEIGHT * dice
    return LossTerms(focal, dice, ce, focal + dice + IMAGE_WEIGHT * ce)
