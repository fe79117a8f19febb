"""Any CLIP tower (``--clip_model``) and any VFM (``--dino_model``): offline, synthetic weights of each
architecture's shapes with narrow widths where the code allows, small images."""
from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from crane import settings
from crane.checkpoints import CheckpointError, apply_settings, metadata_entry, read_checkpoint
from crane.detector import Detector
from crane.models.build import build_model
from crane.models.crane import CraneConfig
from crane.models.prompts import prompt_shape_problem, save_prompt_checkpoint
from crane.models.synthetic import synthetic_clip_state_dict
from crane.models.towers import clip_model_problem, supported_clip_models, tower
from crane.models.vfm import load_vfm

S = 64  # four 16-pixel patches a side


def _narrow_clip(model: str) -> dict:
    """The tower's depth and patch, narrow vision (64) and text (64 wide, 2 blocks)."""
    return synthetic_clip_state_dict(vision_width=64, model=model, text_width=64, text_layers=2)


def test_default_tower_keeps_the_published_values():
    t = tower(settings.DEFAULT_CLIP_MODEL)
    assert (t.depth, t.width, t.patch, t.image_size, t.text_width) == (24, 1024, 14, 336, 768)
    for s in settings.SETTINGS:
        if s.tower_rule is not None:
            assert s.default_for("test", depth=24) == s.default  # the rule gives the published value at 24 blocks
    assert settings.defaults("test", depth=24) == settings.defaults("test")
    assert settings.defaults("test")["clip_model"] == "ViT-L-14-336"
    assert CraneConfig().clip_model == "ViT-L-14-336" and CraneConfig().features_list == (24,)
    assert settings.eattn_blocks(24) == 19 and settings.eattn_blocks(12) == 10  # blocks 6..24, 3..12
    assert settings.same("dinov2_vitb14_reg", "dinov2") and not settings.same("dinov2_vitl14", "dinov2")


def test_which_towers_fit():
    fit = supported_clip_models()
    assert {"ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-L-14-336", "ViT-L-14-quickgelu", "ViT-H-14"} <= set(fit)
    assert clip_model_problem("ViT-B-16") is None
    for name in ("ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP2", "EVA02-B-16", "RN50", "ViT-L-14-CLIPA", "coca_ViT-B-32"):
        problem = clip_model_problem(name)
        assert problem and "\n" not in problem and name in problem
    assert "not an open_clip architecture" in clip_model_problem("ViT-Q-99")


def test_vit_b16_forward_and_train_step():
    config = CraneConfig(clip_model="ViT-B-16", image_size=S, features_list=(3, 6, 9, 12), soft_mean=True,
                         depth=2)  # deep prompts into text block 2 of 2
    model = build_model(_narrow_clip("ViT-B-16"), None, None, config)
    assert model.vision.depth == 12 and model.vision.eattn_start == 3  # the tower rule: blocks 3..12
    assert model.vision.patch_size == 16 and model.config.eattn_layers == 10
    images = torch.randn(2, 3, S, S)
    scores, maps = model(images, model.text_features())
    assert scores.shape == (2,) and maps.shape == (2, S, S) and torch.isfinite(maps).all()
    model.prompt_learner.requires_grad_(True)
    text = model.text_features(published_rounding=False)
    scores, _ = model(images, text)
    scores.sum().backward()
    grads = [p.grad for p in model.prompt_learner.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_detector_scales_the_tower_defaults():
    detector = Detector.from_config(_narrow_clip("ViT-B-16"), clip_model="ViT-B-16", image_size=S)
    assert detector.config.features_list == (12,) and detector.config.eattn_layers == 10
    # and the published tower keeps its published defaults
    assert Detector.from_config(synthetic_clip_state_dict(vision_width=64, vision_layers=2, text_width=64,
                                                          text_layers=2), image_size=28,
                                features_list=(2,)).config.eattn_layers == 2


@pytest.mark.parametrize("dino", ["dinov3_vits16", "dinov2_vits14"])
def test_vfm_pairs_forward(dino):
    """A /16 CLIP with DINOv3 (same grid) and with a /14 DINOv2 (grid resampled): 112 px = 7 x 7 vs 8 x 8."""
    size = 112
    config = CraneConfig(clip_model="ViT-B-16", image_size=size, dino_model=dino, features_list=(12,))
    model = build_model(_narrow_clip("ViT-B-16"), None, "synthetic", config)
    scores, maps = model(torch.randn(1, 3, size, size), model.text_features())
    assert maps.shape == (1, size, size) and torch.isfinite(maps).all() and torch.isfinite(scores).all()


def test_checkpoint_records_its_backbone_and_another_is_refused(tmp_path):
    model = build_model(synthetic_clip_state_dict(vision_width=64, model="ViT-B-16"), None, None,
                        CraneConfig(clip_model="ViT-B-16", image_size=S, features_list=(12,)))
    path = tmp_path / "b16.pth"
    save_prompt_checkpoint(model.prompt_learner, path,
                           {"crane": metadata_entry(settings.recorded(model.config, "checkpoint"))})
    state, info = read_checkpoint(path)
    assert info.settings["clip_model"] == "ViT-B-16" and state["ctx_pos"].shape[-1] == 512
    options = types.SimpleNamespace(**settings.defaults("inspect"))
    with pytest.raises(CheckpointError) as refused:
        apply_settings(options, {"clip_model"}, info)  # --clip_model ViT-L-14-336 typed
    assert "\n" not in str(refused.value) and "--clip_model ViT-B-16" in str(refused.value)
    apply_settings(options, {"clip_model"}, info, force=True)  # --force: the widths still differ
    problem = prompt_shape_problem(state, 12, 4, 9, tower("ViT-L-14-336").text_width, info.settings["clip_model"])
    assert problem and "\n" not in problem and "--force cannot bridge" in problem and "512" in problem
    assert prompt_shape_problem(state, 12, 4, 9, tower("ViT-B-16").text_width) is None


def test_export_parity_vit_b16(tmp_path):
    from crane.deploy import load_model
    from crane.export.graph import InferenceGraph
    from crane.export.writer import default_info, export_graph

    config = CraneConfig(clip_model="ViT-B-16", image_size=S, features_list=(6, 12), soft_mean=True, depth=2)
    detector = Detector(build_model(_narrow_clip("ViT-B-16"), None, None, config))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (80, 96, 3), dtype=np.uint8) for _ in range(2)]
    expected = detector.predict(images, batch_size=2)
    graph = InferenceGraph.from_detector(detector)
    info = default_info(graph, "checkpoint.pth", "0" * 64, settings.recorded(config, "thresholds"), None, False)
    path = tmp_path / "b16.onnx"
    export_graph(graph, path, "onnx", info)
    runtime = load_model(path, "onnxruntime", "cpu")
    assert runtime.info.model.get("clip_model") == "ViT-B-16"
    got = runtime.predict(images, batch_size=2)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=2e-4)
    np.testing.assert_allclose(got.maps, expected.maps, rtol=0, atol=2e-4)


def _reference_rope(h: int, w: int, head_dim: int, base: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv3's RoPE from its definition: patch centres (i + 0.5) / n per axis mapped to [-1, 1], periods
    base ** (2 j / (D / 2)) for j < D / 4, angles 2 pi c / p for (row, column), tiled twice -> sin, cos (HW x D)."""
    periods = base ** (2 * torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 2))
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)
    angles = (2 * math.pi * coords[:, :, None] / periods).reshape(h * w, -1).repeat(1, 2)
    return angles.sin(), angles.cos()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


@pytest.mark.parametrize("grid", [(20, 30), (32, 32), (7, 5)])
def test_dinov3_rope_matches_its_definition_at_any_grid(grid):
    """timm's DINOv3 rotation of queries/keys at a grid other than the native 14 x 14 (224 px) equals the
    from-definition one; the class and register tokens are not rotated."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    vfm = load_vfm("dinov3_vits16", "synthetic")
    m = vfm.model
    head_dim = m.blocks[0].attn.head_dim
    h, w = grid
    sin, cos = _reference_rope(h, w, head_dim)
    q = torch.randn(1, 6, h * w, head_dim, dtype=torch.float64)
    expected = q * cos + _rotate_half(q) * sin
    embed = m.rope.get_embed(shape=(h, w)).double()
    got = apply_rot_embed_cat(q, embed, half=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert m.num_prefix_tokens == 5  # class + 4 registers, left unrotated by timm's Eva attention (as Meta's)
    features = vfm(torch.randn(1, 3, h * 16 + 7, w * 16 + 3))  # pixels past the last whole patch are dropped
    assert features.shape == (1, 384, h, w)
