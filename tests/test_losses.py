"""The training loss: hand-computed values, and one training step against the published implementation.

Conformance tolerances (../shared/conformance/README.md): text features ``<= 1e-4``
max absolute difference; losses relative ``<= 1e-4``; gradients max absolute
difference ``<= 1e-3 * max|expected|``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crane
from crane.data.image import load_mask, preprocess
from crane.engine.feature_cache import FrozenImageEncoder
from crane.engine.train import PromptTextEncoder
from crane.losses import crane_loss, dice_loss, focal_loss, image_logits, pooled_image_embedding
from tests.conftest import conformance_cases, params_or_skip

TRAIN_CASES = conformance_cases(train_step=True)


def _published_focal(logit: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """The published ``FocalLoss.forward`` (no nonlinearity, alpha = 1), step by step."""
    num_class = logit.shape[1]
    logit = logit.view(logit.size(0), logit.size(1), -1).permute(0, 2, 1).contiguous().view(-1, num_class)
    target = target.reshape(-1, 1)
    one_hot_key = torch.zeros(target.size(0), num_class).scatter_(1, target.long(), 1)
    one_hot_key = torch.clamp(one_hot_key, smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot_key * logit).sum(1) + smooth
    return (-1 * torch.pow(1 - pt, gamma) * pt.log()).mean()


def test_focal_by_hand():
    probs = torch.tensor([[[[0.8, 0.3]], [[0.2, 0.7]]]])  # 1 x 2 x 1 x 2: pixel 0 (0.8, 0.2), pixel 1 (0.3, 0.7)
    target = torch.tensor([[[0.0, 1.0]]])  # pixel 0 normal, pixel 1 anomalous: p_true = 0.8 and 0.7
    expected = 0.0
    for p_true in (0.8, 0.7):
        pt = p_true * (1 - 2e-5) + 2e-5  # the closed form of libraries.md
        expected += -((1 - pt) ** 2) * math.log(pt) / 2
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-6)


def test_focal_matches_published_code_on_random_maps():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 2, 5, 7, generator=gen).softmax(1)
    target = (torch.rand(3, 5, 7, generator=gen) > 0.7).float()
    torch.testing.assert_close(focal_loss(probs, target), _published_focal(probs, target), rtol=1e-6, atol=0)
    probs3 = torch.rand(2, 3, 4, 4, generator=gen).softmax(1)  # the general C-class clamp smooth / (C - 1)
    target3 = torch.randint(0, 3, (2, 4, 4), generator=gen).float()
    torch.testing.assert_close(focal_loss(probs3, target3), _published_focal(probs3, target3), rtol=1e-6, atol=0)


def test_dice_by_hand():
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    perfect = mask[:1].clone()
    half = torch.full((1, 2, 2), 0.5)
    # image 1: (2*1 + 1) / (1 + 1 + 1) = 1; image 2: (2*0.5 + 1) / (2 + 1 + 1) = 0.5
    assert dice_loss(torch.cat([perfect, half]), mask).item() == pytest.approx(1 - (1.0 + 0.5) / 2)
    assert dice_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)).item() == pytest.approx(0.0)  # smoothing: 1/1


def test_image_logits_and_pooling_by_hand():
    text = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    emb = torch.tensor([[1.0, 0.0, 0.0]])
    plain = image_logits([], [], emb, text, use_scorebase_pooling=False)
    torch.testing.assert_close(plain, torch.tensor([[100.0, 0.0]]))  # temperature 0.01
    assert F.cross_entropy(plain, torch.tensor([0])).item() == pytest.approx(math.log1p(math.exp(-100.0)), abs=1e-30)
    assert F.cross_entropy(plain, torch.tensor([1])).item() == pytest.approx(100.0, rel=1e-6)
    # One token set of two patches: logits (0, 0) -> w = 0.5 and (0, log 3) -> w = 0.75.
    tokens = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]])
    c = F.normalize(torch.tensor([0.0, 0.5, 0.75]), dim=0)
    z = F.normalize(0.5 * c + 0.5 * emb[0], dim=0)
    torch.testing.assert_close(pooled_image_embedding([tokens], [logits], emb)[0], z)
    torch.testing.assert_close(image_logits([tokens], [logits], emb, text)[0], z[:2] / 0.01)


def test_crane_loss_weights_and_sums_over_token_sets():
    gen = torch.Generator().manual_seed(1)
    tokens = [F.normalize(torch.randn(2, 4, 8, generator=gen), dim=-1) for _ in range(3)]
    text = F.normalize(torch.randn(2, 2, 8, generator=gen), dim=-1)
    emb = F.normalize(torch.randn(2, 8, generator=gen), dim=-1)
    logits = [t @ text.transpose(-1, -2) / 0.07 for t in tokens]
    masks = (torch.rand(2, 6, 6, generator=gen) > 0.5).float()
    labels = torch.tensor([0, 1])
    terms = crane_loss(tokens, logits, emb, text, masks, labels)
    focal = dice = 0.0
    for lg in logits:  # nearest upsampling of the 2 x 2 grid to 6 x 6: each patch covers 3 x 3 pixels
        p = lg.softmax(-1).transpose(1, 2).reshape(2, 2, 2, 2).repeat_interleave(3, 2).repeat_interleave(3, 3)
        focal += _published_focal(p, masks)
        dice += dice_loss((1 - p[:, 0] + p[:, 1]) / 2, masks)
    ce = F.cross_entropy(image_logits(tokens, logits, emb, text), labels)
    torch.testing.assert_close(terms.focal, 2 * focal)
    torch.testing.assert_close(terms.dice, 2 * dice)
    torch.testing.assert_close(terms.ce, ce)
    torch.testing.assert_close(terms.total, 2 * focal + 2 * dice + 0.2 * ce)


def _published_dice(input: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The published ``BinaryDiceLoss.forward``: items along the first axis of ``targets``."""
    n = targets.size()[0]
    input_flat, targets_flat = input.view(n, -1), targets.view(n, -1)
    return 1 - ((2 * (input_flat * targets_flat).sum(1) + 1) / (input_flat.sum(1) + targets_flat.sum(1) + 1)).sum() / n


def test_dice_of_a_one_image_batch_takes_rows_as_items_as_published():
    """The published loop squeezes the mask batch: a 1-image mask becomes ``S x S`` and its Dice loss averages
    over the ``S`` rows; batches of two or more are unaffected."""
    gen = torch.Generator().manual_seed(3)
    tokens = [F.normalize(torch.randn(1, 4, 8, generator=gen), dim=-1)]
    text = F.normalize(torch.randn(1, 2, 8, generator=gen), dim=-1)
    emb = F.normalize(torch.randn(1, 8, generator=gen), dim=-1)
    logits = [t @ text.transpose(-1, -2) / 0.07 for t in tokens]
    masks = torch.zeros(1, 6, 6)
    masks[0, 1:3, 2:5] = 1
    p = logits[0].softmax(-1).transpose(1, 2).reshape(1, 2, 2, 2).repeat_interleave(3, 2).repeat_interleave(3, 3)
    whole = (1 - p[:, 0] + p[:, 1]) / 2
    squeezed = crane_loss(tokens, logits, emb, text, masks, torch.tensor([1]), dice_rows_of_single_image=True)
    per_image = crane_loss(tokens, logits, emb, text, masks, torch.tensor([1]))
    torch.testing.assert_close(squeezed.dice, 2 * _published_dice(whole, masks.squeeze()))
    torch.testing.assert_close(per_image.dice, 2 * _published_dice(whole, masks))
    assert abs(squeezed.dice.item() - per_image.dice.item()) > 1e-3  # the two readings differ on this mask
    torch.testing.assert_close(squeezed.focal, per_image.focal)
    pair = ([t.repeat(2, 1, 1) for t in tokens], [lg.repeat(2, 1, 1) for lg in logits], emb.repeat(2, 1), text,
            masks.repeat(2, 1, 1), torch.tensor([1, 1]))
    torch.testing.assert_close(crane_loss(*pair, dice_rows_of_single_image=True).total, crane_loss(*pair).total,
                               rtol=0, atol=0)


def test_focal_gradient_is_finite_at_saturated_probabilities():
    probs = torch.tensor([[[[1.0]], [[0.0]]]], requires_grad=True)  # the 1e-5 smoothing keeps log(pt) finite
    focal_loss(probs, torch.ones(1, 1, 1)).backward()
    assert torch.isfinite(probs.grad).all()


@pytest.mark.slow
@pytest.mark.parametrize("case", params_or_skip(TRAIN_CASES, [c["name"] for c in TRAIN_CASES],
                                                "a conformance case with a training step"))
def test_train_step_matches_published(case, synth_weights, conformance_dir):
    """One step on all N images at once, image-conditioned prompts (pad_suffix), nearest upsampling.

    The published training takes D-Attn's mean over the whole batch (quirk 3), so the D-Attn
    case runs with ``dattn_batch_mean``; the features go through the training cache's
    per-image / per-batch split (``FrozenImageEncoder``), as in ``train.py``.
    """
    args = case["args"]
    dino = args["dino_model"]
    config = crane.CraneConfig(features_list=tuple(args["features_list"]), dino_model=dino,
                               image_size=args["image_size"], dattn_batch_mean=True)
    model = crane.build_model(synth_weights("clip", **case["clip"]), conformance_dir / case["checkpoint"],
                              synth_weights("dino", **case["dino"]) if dino != "none" else None, config)
    model.prompt_learner.requires_grad_(True)
    folder = conformance_dir / "cases" / case["name"] / "images"
    n, size = case["images"]["n"], args["image_size"]
    images = torch.stack([preprocess(folder / f"{i:03d}.png", size) for i in range(n)])
    masks = torch.stack([load_mask(folder / f"{i:03d}_mask.png", size) for i in range(n)])
    labels = (masks.flatten(1).amax(1) > 0).long()
    expected = np.load(conformance_dir / "cases" / case["name"] / "expected.npz")

    encoder = FrozenImageEncoder(model)
    feats = encoder.assemble(encoder.encode(images), "cpu")
    text = PromptTextEncoder(model, "pad_suffix")(feats.image_embedding)
    np.testing.assert_allclose(text.detach().numpy(), expected["text_features_train"], atol=1e-4, rtol=0)
    logits = model.patch_logits(feats, text)
    terms = crane_loss(feats.patch_tokens, logits, feats.image_embedding, text, masks, labels, "nearest")
    for name, value in (("loss_focal", terms.focal), ("loss_dice", terms.dice), ("loss_ce", terms.ce),
                        ("loss_total", terms.total)):
        assert value.item() == pytest.approx(float(expected[name]), rel=1e-4), name
    terms.total.backward()
    grads = {k[len("grad."):]: expected[k] for k in expected.files if k.startswith("grad.")}
    params = dict(model.prompt_learner.named_parameters())
    assert sorted(grads) == sorted(params)
    for name, want in grads.items():
        got = params[name].grad.numpy()
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max(), name
