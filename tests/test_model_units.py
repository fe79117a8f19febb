"""Unit tests of the inference core on tiny models, against the plain published arithmetic.

The reference is ``scripts/published_reference.py`` (materialised attention matrices,
the in-place updates of the original code, sequence-first layout, batch-wide D-Attn
mean); ``test_reference_matches_conformance`` ties it to the published outputs.
The tiny CLIP: vision width 128 (2 heads), 8 blocks, patch 8, native 64x64 (grid 8),
text width 128 (2 heads), 4 blocks, joint width 64; E-Attn runs in the last 5 blocks.
"""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

import crane
from crane.data.image import preprocess
from crane.models.clip_loader import build_clip_from_state_dict
from crane.models.errors import CheckpointMismatchError
from crane.models.head import anomaly_probability_maps, image_scores, smooth_maps
from crane.models.prompts import PromptLearner, encode_text, load_prompt_checkpoint, save_prompt_checkpoint
from crane.models.vfm import dattn_attention
from crane.models.vision import ATTN_TYPES, CraneVisionEncoder, interpolate_pos_embed, self_correlation_attention
from tests.conftest import REPO, conformance_case

_spec = importlib.util.spec_from_file_location("published_reference", REPO / "scripts" / "published_reference.py")
ref = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ref
_spec.loader.exec_module(ref)

EATTN_LAYERS = 5  # blocks 4..8 of the tiny 8-block tower run the dual path
TINY_OPTS = dict(eattn_layers=EATTN_LAYERS, depth=3)  # deep prompts into text blocks 2..3
ATOL = 1e-5


def tiny_clip_state_dict(vision_width: int = 128, vision_layers: int = 8, patch_size: int = 8, image_size: int = 64,
                         text_width: int = 128, text_layers: int = 4, embed_dim: int = 64, seed: int = 0
                         ) -> dict[str, torch.Tensor]:
    """An OpenAI-format CLIP state dict of a tiny model (open_clip's initialisation with ``seed``,
    layer norms and biases perturbed so that none is trivially 1 or 0)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(embed_dim, CLIPVisionCfg(layers=vision_layers, width=vision_width, patch_size=patch_size,
                                              image_size=image_size, head_width=64),
                     CLIPTextCfg(context_length=77, vocab_size=49408, width=text_width, heads=text_width // 64,
                                 layers=text_layers), quick_gelu=True)
        sd = {k: v.clone() for k, v in model.state_dict().items() if k != "logit_bias"}
        for k, v in sd.items():
            if v.ndim == 1 and k != "visual.class_embedding":
                v.add_(0.1 * torch.randn_like(v))
    return sd


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``n_out x n_in`` weights of 1-D linear interpolation with ``align_corners=False`` (no antialias),
    written from the definition: source = (i + 0.5) * n_in / n_out - 0.5, clamped at 0."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        w[i, i0] += 1 - frac
        w[i, i1] += frac
    return w


def hand_upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """``... x g x g`` -> ``... x size x size`` bilinear."""
    m = bilinear_matrix(grid.shape[-1], size)
    return m @ grid @ m.T


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return tiny_clip_state_dict()


@pytest.fixture(scope="module")
def tiny_sd14() -> dict[str, torch.Tensor]:
    """The tiny CLIP with patch 14 (native 112, grid 8), whose grid matches DINOv2's at every size."""
    return tiny_clip_state_dict(patch_size=14, image_size=112, seed=2)


@pytest.fixture(scope="module")
def tiny_clip(tiny_sd):
    return build_clip_from_state_dict(tiny_sd)


@pytest.fixture(scope="module")
def dino_sd() -> dict[str, torch.Tensor]:
    """Random timm DINOv2 ViT-B/14-reg4 weights (native 518) with LayerScale far from its 1e-5 init."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=518)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        for k, v in sd.items():
            if ".ls" in k:
                v.copy_(0.2 + 0.05 * torch.randn_like(v))
    return sd


def _images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        base = 0.5 + 0.3 * np.sin(2 * np.pi * ((2 + i) * xx + rng.random()))[..., None] * rng.random(3)
        img = base + 0.1 * rng.standard_normal((size, size, 3))
        if i % 2:
            img[size // 3:size // 2, size // 4:size // 2] = 0.95
        out.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return out


def _batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.stack([preprocess(im, size) for im in _images(n, size, seed)])


# --- E-Attn -----------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_self_correlation_attention_matches_materialised(attn_type):
    torch.manual_seed(0)
    b, h, n, hd = 2, 3, 17, 16
    q, k, v = (torch.randn(b, h, n, hd) for _ in range(3))
    ours = self_correlation_attention(q, k, v, attn_type)
    a_s, _ = ref.attention_matrices(*(t.reshape(b * h, n, hd) for t in (q, k, v)), attn_type)
    expected = (a_s @ v.reshape(b * h, n, hd)).reshape(b, h, n, hd)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0, equal_nan=False)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_dual_path_matches_reference(attn_type, tiny_sd, tiny_clip):
    """Blocks 1-3 standard, 4-8 dual path, input 80x80 (grid 10, interpolated positions)."""
    enc = CraneVisionEncoder(tiny_clip.visual, attn_type, EATTN_LAYERS, layer_aliasing=True)
    images = _batch(2, 80)
    layers = [3, 4, 6, 8]
    with torch.no_grad():
        streams = enc.forward_features(images, layers, dattn_layers=layers)
        expected = ref.vision_transformer(tiny_sd, images, layers, attn_type, EATTN_LAYERS, dattn_layers=layers)
    tokens = {layer: streams.tokens(layer) for layer in layers}
    torch.testing.assert_close(streams.xo, expected.xo.transpose(0, 1), atol=ATOL, rtol=0, equal_nan=False)
    for layer, exp in zip(layers, expected.tokens):
        torch.testing.assert_close(tokens[layer], exp.transpose(0, 1), atol=ATOL, rtol=0, equal_nan=False)
    for layer in layers:  # D-Attn inputs at every layer, as the in-place updates of the original leave them
        torch.testing.assert_close(streams.dattn_inputs[layer], expected.ts[layer].transpose(0, 1), atol=ATOL, rtol=0,
                                   equal_nan=False)
    # Quirk 1: every requested E-Attn layer holds the last block's refined stream; layer 3 is standard.
    assert torch.equal(tokens[4], tokens[8]) and torch.equal(tokens[6], tokens[8])
    assert not torch.allclose(tokens[3], tokens[8], atol=1e-2)


def test_true_multilayer_mode_returns_each_layers_tokens(tiny_sd, tiny_clip):
    enc = CraneVisionEncoder(tiny_clip.visual, "qq+kk+vv", EATTN_LAYERS, layer_aliasing=False)
    images = _batch(2, 64)
    layers = [4, 6, 8]
    with torch.no_grad():
        streams = enc.forward_features(images, layers)
        expected = ref.vision_transformer(tiny_sd, images, layers, "qq+kk+vv", EATTN_LAYERS, snapshot_tokens=True)
    tokens = {layer: streams.tokens(layer) for layer in layers}
    for layer, exp in zip(layers, expected.tokens):
        torch.testing.assert_close(tokens[layer], exp.transpose(0, 1), atol=ATOL, rtol=0, equal_nan=False)
    assert (tokens[4] - tokens[8]).abs().max() > 1e-2
    assert (tokens[6] - tokens[8]).abs().max() > 1e-2
    # Through the model: one normalised token set per layer, each from its own refined stream.
    model = _tiny_model(tiny_sd, features_list=tuple(layers), layer_aliasing=False)
    with torch.no_grad():
        sets = model.encode_image(images).patch_tokens
    for got, exp in zip(sets, expected.tokens):
        exp = exp.transpose(0, 1)[:, 1:]
        exp = F.normalize(F.layer_norm(exp, (128,), tiny_sd["visual.ln_post.weight"], tiny_sd["visual.ln_post.bias"])
                          @ tiny_sd["visual.proj"], dim=-1)
        torch.testing.assert_close(got, exp, atol=ATOL, rtol=0, equal_nan=False)


# --- D-Attn -----------------------------------------------------------------------------------


def test_dattn_input_is_after_attention_residual(tiny_clip):
    """Quirk 2: at a later dual-path block ``t = xo_7 + y_o,8`` (its stream after the attention residual,
    before the MLP); at the first dual-path block (4 here) ``t = x_3 + y_s,4`` (the refined stream)."""
    enc = CraneVisionEncoder(tiny_clip.visual, "qq+kk+vv", EATTN_LAYERS)
    blocks = tiny_clip.visual.transformer.resblocks
    seen = {}
    handles = [blocks[i - 1].ln_1.register_forward_pre_hook(
        lambda module, args, i=i: seen.setdefault(i, args[0].clone())) for i in (4, 8)]
    try:
        with torch.no_grad():
            streams = enc.forward_features(_batch(2, 64), [4, 8], dattn_layers=[4, 8])
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        y_o, _ = enc._dual_attention(blocks[7], seen[8])
        _, y_s = enc._dual_attention(blocks[3], seen[4])
    t = streams.dattn_inputs
    torch.testing.assert_close(t[8], seen[8] + y_o, atol=ATOL, rtol=0, equal_nan=False)
    torch.testing.assert_close(t[4], seen[4] + y_s, atol=ATOL, rtol=0, equal_nan=False)
    assert (t[8] - seen[8]).abs().max() > 1e-2 and (t[4] - seen[4]).abs().max() > 1e-2


@pytest.mark.parametrize("side", [5, 8])
def test_dattn_tokens_match_reference(side, tiny_sd, tiny_clip):
    """``Linear_out(A_d v)`` with values from ``ln_1(t)``; grid 8 resized to ``side`` when it differs."""
    enc = CraneVisionEncoder(tiny_clip.visual, "qq+kk+vv", EATTN_LAYERS)
    torch.manual_seed(0)
    t = torch.randn(2, 65, 128)
    attn = torch.randn(2, side * side, side * side).softmax(-1)
    with torch.no_grad():
        ours = enc.dattn_tokens(t, 8, attn, (side, side))
        expected = ref.dattn_tokens(tiny_sd, t.transpose(0, 1), 8, attn)
    assert ours.shape == (2, side * side, 128)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0, equal_nan=False)


def test_dattn_mean_per_image_and_batch_wide():
    torch.manual_seed(0)
    feats = torch.randn(3, 16, 4, 4) + 0.5
    per_image = dattn_attention(feats)
    for i in range(3):
        torch.testing.assert_close(per_image[i:i + 1], ref.dattn_matrix(feats[i:i + 1]), atol=1e-6, rtol=0, equal_nan=False)
        torch.testing.assert_close(dattn_attention(feats[i:i + 1]), per_image[i:i + 1], atol=1e-6, rtol=0, equal_nan=False)
    batch_wide = dattn_attention(feats, batch_mean=True)
    torch.testing.assert_close(batch_wide, ref.dattn_matrix(feats), atol=1e-6, rtol=0, equal_nan=False)
    assert (batch_wide - per_image).abs().max() > 1e-3
    # Masked (negative) entries get exactly zero weight; rows sum to one.
    m = (F.normalize(feats.flatten(2), dim=1).transpose(1, 2) @ F.normalize(feats.flatten(2), dim=1))
    m = (m - 1.2 * m.mean(dim=(1, 2), keepdim=True)) * 3
    assert torch.all(per_image[m < 0] == 0)
    torch.testing.assert_close(per_image.sum(-1), torch.ones(3, 16), atol=1e-6, rtol=0, equal_nan=False)


# --- positional embedding -----------------------------------------------------------------------


@pytest.mark.parametrize("native,grid", [(4, 6), (4, 3), (3, 3)])
def test_positional_embedding_interpolation_by_hand(native, grid):
    torch.manual_seed(0)
    pos = torch.randn(1 + native * native, 5)
    ours = interpolate_pos_embed(pos, grid)
    assert ours.shape == (1 + grid * grid, 5)
    torch.testing.assert_close(ours[0], pos[0], atol=0, rtol=0)  # class position kept
    patch = pos[1:].numpy().reshape(native, native, 5).transpose(2, 0, 1)
    expected = hand_upsample(patch.astype(np.float64), grid).transpose(1, 2, 0).reshape(grid * grid, 5)
    np.testing.assert_allclose(ours[1:].numpy(), expected, atol=1e-6, rtol=0, equal_nan=False)


# --- prompt learner and text encoder --------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-L-14-336")


def test_prompt_buffers_come_from_tokenizer(tiny_clip, tokenizer):
    learner = PromptLearner(tiny_clip.token_embedding, tokenizer, depth=3)
    emb = tiny_clip.token_embedding.weight
    x_id = int(tokenizer(["X"])[0, 1])
    words = {"pos": ["object", "."], "neg": ["damaged", "object", "."]}
    for state, tail in words.items():
        ids = getattr(learner, f"tokenized_prompts_{state}")
        assert ids.shape == (1, 1, 77) and ids.dtype == torch.int32
        ids = ids[0, 0].long()
        expected = [49406] + [x_id] * 12 + [int(tokenizer([w])[0, 1]) for w in tail] + [49407]
        assert ids[:len(expected)].tolist() == expected and not ids[len(expected):].any()
        torch.testing.assert_close(getattr(learner, f"token_prefix_{state}"), emb[49406].view(1, 1, 1, -1))
        torch.testing.assert_close(getattr(learner, f"token_suffix_{state}"), emb[ids[13:]].view(1, 1, 64, -1))
    assert learner.ctx_pos.shape == (1, 1, 12, 128) and len(learner.compound_prompts_text) == 2


def test_prompt_checkpoint_roundtrip(tmp_path, tiny_clip, tokenizer):
    torch.manual_seed(0)
    learner = PromptLearner(tiny_clip.token_embedding, tokenizer)
    path = tmp_path / "sub" / "epoch_1.pth"
    save_prompt_checkpoint(learner, path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert list(raw) == ["prompt_learner"] and len(raw["prompt_learner"]) == 16
    expected_keys = {"ctx_pos", "ctx_neg", *(f"compound_prompts_text.{i}" for i in range(8)),
                     *(f"{b}_{s}" for b in ("token_prefix", "token_suffix", "tokenized_prompts") for s in ("pos", "neg"))}
    assert set(raw["prompt_learner"]) == expected_keys
    torch.manual_seed(1)
    other = PromptLearner(tiny_clip.token_embedding, tokenizer)
    assert not torch.equal(other.ctx_pos, learner.ctx_pos)
    other.load_official(load_prompt_checkpoint(path))
    for k, v in learner.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    assert not list(tmp_path.glob("sub/*.tmp*"))


def test_official_checkpoints_fit_and_restore_buffers(conformance_dir, tokenizer):
    """The official 16-key checkpoints load strictly into a 768-wide learner; buffers come from the file."""
    torch.manual_seed(0)
    learner = PromptLearner(torch.nn.Embedding(49408, 768), tokenizer)
    paths = sorted((conformance_dir / "checkpoints").glob("*/epoch_*.pth"))
    assert len(paths) == 5
    for path in paths:
        sd = load_prompt_checkpoint(path)
        learner.load_official(sd, source=str(path))
        for k, v in sd.items():
            assert torch.equal(learner.state_dict()[k], v.to(learner.state_dict()[k].dtype)), (path, k)
    assert torch.equal(learner.tokenized_prompts_pos[0, 0, :16].long(), tokenizer(["X " * 12 + "object."])[0, :16])


def test_checkpoint_mismatch_names_keys_and_shapes(tmp_path, tiny_clip, tokenizer):
    learner = PromptLearner(tiny_clip.token_embedding, tokenizer)
    sd = {k: v.clone() for k, v in learner.state_dict().items()}
    del sd["compound_prompts_text.7"]
    sd["ctx_extra"] = torch.zeros(1)
    sd["ctx_pos"] = torch.zeros(1, 1, 12, 768)
    with pytest.raises(CheckpointMismatchError) as err:
        learner.load_official(sd, source="my.pth")
    msg = str(err.value)
    for needle in ("my.pth", "compound_prompts_text.7", "ctx_extra", "ctx_pos", "(1, 1, 12, 768)", "(1, 1, 12, 128)"):
        assert needle in msg, (needle, msg)
    bad = tmp_path / "not_crane.pth"
    torch.save({"model": {}}, bad)
    with pytest.raises(CheckpointMismatchError, match="prompt_learner"):
        load_prompt_checkpoint(bad)


def _tiny_model(tiny_sd, **options) -> crane.CraneModel:
    torch.manual_seed(0)
    cfg = crane.CraneConfig(**{**TINY_OPTS, "features_list": (8,), "image_size": 64, **options})
    return crane.build_model(tiny_sd, None, None, cfg)


def test_text_features_match_reference(tiny_sd):
    model = _tiny_model(tiny_sd)
    with torch.no_grad():
        ours = model.text_features()
        expected = ref.text_features(tiny_sd, model.prompt_learner.state_dict())
    assert ours.shape == (1, 2, 64)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0, equal_nan=False)


def test_deep_prompts_rounded_through_fp16(tiny_sd):
    """Quirk 4: a deep-prompt value that fp16 cannot hold gives the text features of its fp16 rounding."""
    model = _tiny_model(tiny_sd)
    deep = model.prompt_learner.compound_prompts_text[0]
    value = 0.1 + 1e-6
    rounded = float(torch.tensor(value).half().float())
    assert rounded != np.float32(value)

    def features(v: float) -> torch.Tensor:
        with torch.no_grad():
            deep[1, 3] = v
            return model.text_features()

    exact, half = features(value), features(rounded)
    assert torch.equal(exact, half)
    assert not torch.equal(features(rounded + 2 ** -10), half)  # a change fp16 can hold does show
    with torch.no_grad():
        deep[1, 3] = value
        torch.testing.assert_close(exact, ref.text_features(tiny_sd, model.prompt_learner.state_dict()),
                                   atol=ATOL, rtol=0, equal_nan=False)


def test_image_conditioned_prompt_pad_suffix(tiny_sd):
    """``pad_suffix``: the image embedding is the 13th context token and the EOT moves one to the right."""
    model = _tiny_model(tiny_sd)
    img = F.normalize(torch.randn(3, 128), dim=-1)
    prompts, ids = model.prompt_learner(img, "pad_suffix")
    plain, plain_ids = model.prompt_learner()
    assert prompts.shape == (6, 77, 128) and ids.shape == (6, 77)
    torch.testing.assert_close(prompts[:3, 13], img)
    torch.testing.assert_close(prompts[3:, 13], img)
    torch.testing.assert_close(prompts[0, 14:], plain[0, 13:-1])
    assert ids[:3].argmax(-1).tolist() == [int(plain_ids[0].argmax()) + 1] * 3
    assert ids[3:].argmax(-1).tolist() == [int(plain_ids[1].argmax()) + 1] * 3
    with torch.no_grad():
        feats = model.text_features(img)
    assert feats.shape == (3, 2, 64)
    assert (feats[0] - feats[1]).abs().max() > 1e-4


# --- head -------------------------------------------------------------------------------------------


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_probability_maps_soft_mean_and_not_by_hand():
    torch.manual_seed(0)
    logits = [torch.randn(2, 9, 2) * 3 for _ in range(2)]  # 2 token sets, grid 3x3
    size = 7
    grids = [lg.numpy().astype(np.float64).reshape(2, 3, 3, 2).transpose(0, 3, 1, 2) for lg in logits]
    soft = np.mean([hand_upsample(_softmax(g, 1), size) for g in grids], axis=0)
    hard = _softmax(np.mean([hand_upsample(g, size) for g in grids], axis=0), 1)
    ours_soft = anomaly_probability_maps(logits, size, soft_mean=True)
    ours_hard = anomaly_probability_maps(logits, size, soft_mean=False)
    assert ours_soft.shape == (2, 2, size, size)
    np.testing.assert_allclose(ours_soft.numpy(), soft, atol=1e-6, rtol=0, equal_nan=False)
    np.testing.assert_allclose(ours_hard.numpy(), hard, atol=1e-6, rtol=0, equal_nan=False)
    assert np.abs(soft - hard).max() > 1e-2


def test_score_based_pooling_by_hand():
    rng = np.random.default_rng(0)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    tokens = [unit(rng.standard_normal((2, 4, 3))) for _ in range(2)]
    text = unit(rng.standard_normal((1, 2, 3)))
    emb = unit(rng.standard_normal((2, 3)))
    logits = [t @ text[0].T / 0.07 for t in tokens]
    ours = image_scores([torch.tensor(t) for t in tokens], [torch.tensor(lg) for lg in logits],
                        torch.tensor(emb), torch.tensor(text))
    expected = []
    for b in range(2):
        w = _softmax((logits[0][b] + logits[1][b]) / 2, -1)[:, 1]  # L
        c = unit(((tokens[0][b] + tokens[1][b]) / 2 * w[:, None]).sum(0))
        z = unit(0.5 * c + 0.5 * emb[b])
        expected.append(_softmax(z @ text[0].T / 0.07, -1)[1])
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6, rtol=0, equal_nan=False)


def test_smoothing_is_scipy_gaussian_reflect():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 40, 40)).astype(np.float32)
    maps[:, :3] = 1.0  # a bright border, where the border mode matters
    ours = smooth_maps(maps, 4)
    assert ours.dtype == np.float32 and ours.shape == maps.shape
    for i in range(2):
        np.testing.assert_allclose(ours[i], gaussian_filter(maps[i], sigma=4, mode="reflect"), atol=1e-6, rtol=0)
        assert np.abs(ours[i] - gaussian_filter(maps[i], sigma=4, mode="mirror")).max() > 1e-3


# --- whole pipeline -------------------------------------------------------------------------------------


def _reference_for(det: crane.Detector, tiny_sd, dino=None, **overrides) -> "ref.PublishedCrane":
    cfg = det.config
    return ref.PublishedCrane(tiny_sd, det.model.prompt_learner.state_dict(), features_list=cfg.features_list,
                              image_size=cfg.image_size, soft_mean=cfg.soft_mean, attn_type=cfg.attn_type,
                              dino_sd=dino, sigma=cfg.sigma, both_eattn_dattn=cfg.both_eattn_dattn,
                              use_scorebase_pooling=cfg.use_scorebase_pooling, eattn_layers=EATTN_LAYERS)


def _detector(tiny_sd, dino=None, **kwargs) -> crane.Detector:
    torch.manual_seed(0)
    return crane.Detector.from_config(clip_weights=tiny_sd, dino_model="dinov2" if dino is not None else "none",
                                      dino_weights=dino, **{**TINY_OPTS, **kwargs})


def _assert_matches(out: crane.Prediction, expected: dict, atol: float = ATOL) -> None:
    np.testing.assert_allclose(out.scores, expected["score"], atol=atol, rtol=0, equal_nan=False)
    np.testing.assert_allclose(out.maps, expected["anomaly_map"], atol=atol, rtol=0, equal_nan=False)


@pytest.mark.parametrize("options", [
    dict(features_list=(2, 4, 6, 8), soft_mean=True),
    dict(features_list=(8,), soft_mean=False, attn_type="(q+k+v)^2", use_scorebase_pooling=False),
], ids=["crane", "qkv2_no_pooling"])
def test_predict_matches_reference(options, tiny_sd):
    det = _detector(tiny_sd, image_size=72, **options)
    images = _images(3, 90)
    expected = _reference_for(det, tiny_sd).predict(torch.stack([ref.preprocess(im, 72) for im in images]))
    _assert_matches(det.predict(images), expected)


@pytest.mark.slow
@pytest.mark.parametrize("both,clip,layers", [(True, "tiny_sd14", (8,)), (False, "tiny_sd", (8,)),
                                              (True, "tiny_sd14", (8, 2, 4, 6))],
                         ids=["both_eattn_dattn", "dattn_only_resized_values", "dattn_at_every_layer"])
def test_crane_plus_matches_reference(both, clip, layers, dino_sd, request):
    """D-Attn with DINOv2 at 112 (grid 8), per-image and batch-wide mean. ``dattn_only`` runs the patch-8
    CLIP (grid 14), so its values are resized to DINOv2's grid. With several layers every one gets its
    D-Attn set (before, in the first dual-path block 4 and after it), the sets in block order."""
    clip_sd = request.getfixturevalue(clip)
    det = _detector(clip_sd, dino_sd, features_list=layers, image_size=112, both_eattn_dattn=both)
    assert len(det.model.set_layout) == len(layers) * (2 if both else 1)
    reference = _reference_for(det, clip_sd, dino_sd)
    images = _images(2, 112)
    batch = torch.stack([ref.preprocess(im, 112) for im in images])
    per_image = [reference.predict(batch[i:i + 1]) for i in range(2)]
    expected = {k: np.concatenate([p[k] for p in per_image]) for k in ("score", "anomaly_map")}
    out = det.predict(images, batch_size=2)
    _assert_matches(out, expected)
    det.config.dattn_batch_mean = True
    whole = det.predict(images, batch_size=2)
    _assert_matches(whole, reference.predict(batch))
    assert np.abs(whole.maps - out.maps).max() > 1e-4


@pytest.mark.parametrize("dino", [False, True], ids=["crane", "crane_plus"])
def test_predict_is_batch_invariant(dino, request):
    dino_sd = request.getfixturevalue("dino_sd") if dino else None
    clip_sd = request.getfixturevalue("tiny_sd14" if dino else "tiny_sd")
    size = 112 if dino else 56  # DINOv2 grid 8: at grid 4 the random features are so alike that D-Attn masks whole rows
    det = _detector(clip_sd, dino_sd, features_list=(4, 6, 8) if not dino else (8,), image_size=size)
    images = _images(3, 70, seed=3)
    one = [det.predict(im) for im in images]
    three = det.predict(images, batch_size=3)
    np.testing.assert_allclose(three.scores, np.concatenate([o.scores for o in one]), atol=1e-6, rtol=0, equal_nan=False)
    np.testing.assert_allclose(three.maps, np.concatenate([o.maps for o in one]), atol=1e-6, rtol=0, equal_nan=False)


def test_predict_input_types(tmp_path, tiny_sd):
    det = _detector(tiny_sd, features_list=(8,), image_size=64)
    arrays = _images(2, 50, seed=5)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    base = det.predict(arrays)
    assert base.scores.shape == (2,) and base.maps.shape == (2, 64, 64)
    assert base.scores.dtype == np.float32 and base.maps.dtype == np.float32
    variants = {
        "paths": [str(p) for p in paths],
        "pathlib": paths,
        "pil": [Image.fromarray(a) for a in arrays],
        "mixed": [str(paths[0]), Image.fromarray(arrays[1])],
        "tuple": tuple(arrays),
    }
    for name, images in variants.items():
        out = det.predict(images, batch_size=1)
        np.testing.assert_array_equal(out.scores, base.scores, err_msg=name)
        np.testing.assert_array_equal(out.maps, base.maps, err_msg=name)
    for single in (arrays[1], str(paths[1]), paths[1], Image.fromarray(arrays[1])):
        out = det.predict(single)
        assert out.scores.shape == (1,) and out.maps.shape == (1, 64, 64)
        np.testing.assert_array_equal(out.maps[0], base.maps[1])
    empty = det.predict([])
    assert empty.scores.shape == (0,) and empty.maps.shape == (0, 64, 64)
    gray = arrays[0].mean(axis=2).astype(np.uint8)  # one H x W grayscale array is one image
    np.testing.assert_array_equal(det.predict(gray).maps, det.predict(np.repeat(gray[:, :, None], 3, axis=2)).maps)


def test_vfm_on_a_finer_grid_puts_every_token_set_on_its_grid(tiny_sd, dino_sd):
    """DINO v1 / SAM give a finer grid than CLIP's. As published, each layer's E-Attn tokens are then
    resized to the VFM grid when the layer is reached (its own refined tokens, not the aliased ones),
    so all token sets share the VFM grid and score pooling combines them directly."""
    det = _detector(tiny_sd, dino_sd, features_list=(6, 8), image_size=64)
    model = det.model
    feats = F.normalize(torch.randn(2, 16, 12, 12, generator=torch.Generator().manual_seed(0)) + 1.0, dim=1)
    model.vfm.forward = lambda images: feats  # a VFM on a 12x12 grid (CLIP's is 8x8 here)
    images = torch.stack([preprocess(im, 64) for im in _images(2, 64)])
    with torch.no_grad():
        sets = model.encode_image(images).patch_tokens
        streams = model.vision.forward_features(images, [6, 8])
        scores = model.scores(model.encode_image(images), model.patch_logits(model.encode_image(images),
                                                                              det.text_features), det.text_features)
    assert [s.shape[1] for s in sets] == [144] * 4 and not scores.isnan().any()
    for index, layer in ((1, 6), (3, 8)):
        own = ref._layer_norm(F.interpolate(streams.own[layer][:, 1:].transpose(1, 2).reshape(2, 128, 8, 8),
                                            size=(12, 12), mode="bilinear", align_corners=False)
                              .flatten(2).transpose(1, 2), tiny_sd, "visual.ln_post") @ tiny_sd["visual.proj"]
        torch.testing.assert_close(sets[index], F.normalize(own, dim=-1), atol=ATOL, rtol=0)
    assert (sets[1] - sets[3]).abs().max() > 1e-3  # layer 6's own tokens, not aliased to layer 8's


def test_dattn_rows_with_every_entry_masked_fall_back_to_plain_softmax():
    """Identical features: every M entry is negative; the published code would give NaN rows."""
    features = torch.ones(1, 4, 3, 3)
    attn = dattn_attention(features)
    torch.testing.assert_close(attn, torch.full((1, 9, 9), 1 / 9))
    varied = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    f = F.normalize(varied.flatten(2), dim=1)
    sim = f.transpose(1, 2) @ f
    m = (sim - 1.2 * sim.mean(dim=(1, 2), keepdim=True)) * 3
    expected = m.masked_fill(m < 0, float("-inf")).softmax(-1)  # the published masking where it is defined
    torch.testing.assert_close(dattn_attention(varied), expected)


# --- the reference itself ----------------------------------------------------------------------------


@pytest.mark.slow
def test_reference_matches_conformance(synth, conformance_dir):
    """The plain reference reproduces the published outputs (case ``crane_visa_336_qqkk``)."""
    case = conformance_case("crane_visa_336_qqkk")
    args = case["args"]
    prompt_sd = load_prompt_checkpoint(conformance_dir / case["checkpoint"])
    reference = ref.PublishedCrane(synth.clip_state_dict(**case["clip"]), prompt_sd,
                                   features_list=args["features_list"], image_size=args["image_size"],
                                   soft_mean=args["soft_mean"], attn_type=args["attn_type"])
    expected = np.load(conformance_dir / "cases" / case["name"] / "expected.npz")
    np.testing.assert_allclose(reference.text.numpy(), expected["text_features"], atol=1e-6, rtol=0, equal_nan=False)
    folder = conformance_dir / "cases" / case["name"] / "images"
    for i in range(case["images"]["n"]):
        out = reference.predict(ref.preprocess(folder / f"{i:03d}.png", args["image_size"])[None])
        for key in ("image_features", "anomaly_map_raw", "anomaly_map", "score"):
            np.testing.assert_allclose(out[key], expected[key][i:i + 1], atol=1e-6, rtol=0, equal_nan=False, err_msg=key)
        np.testing.assert_allclose(out["patch_probs"], expected["patch_probs"][:, i:i + 1], atol=1e-6, rtol=0, equal_nan=False)


def test_predict_tensor_with_image_conditioned_prompts():
    """``--train_with_img_cls_prob 1`` at test: each image scored against its own text pair.

    The image embedding becomes a prompt token, so the joint width equals the text width (as in ViT-L/14).
    """
    det = _detector(tiny_clip_state_dict(embed_dim=128, seed=4), features_list=(8,), image_size=64)
    batch = torch.stack([preprocess(a, 64) for a in _images(2, 50, seed=3)])
    scores, maps = det.predict_tensor(batch, image_token_type="pad_suffix")
    with torch.no_grad():
        feats = det.model.encode_image(batch)
        text = det.model.text_features(feats.image_embedding, "pad_suffix")
        logits = det.model.patch_logits(feats, text)
        expected_scores, expected_maps = det.model.scores(feats, logits, text), det.model.maps(logits)
    assert text.shape[0] == 2 and not torch.allclose(text[0], text[1])
    torch.testing.assert_close(scores, expected_scores, atol=0, rtol=0)
    torch.testing.assert_close(maps, expected_maps, atol=0, rtol=0)
    plain_scores, _ = det.predict_tensor(batch)
    assert not torch.allclose(scores, plain_scores)
