"""Loading the backbones: CLIP from every supported source, the VFMs from Meta's and timm's
layouts, and fast, instructive failures when weights are missing offline."""
from __future__ import annotations

import dataclasses
import socket
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import crane
from crane.data.image import OPENAI_MEAN, OPENAI_STD
from crane.models import hub
from crane.models.clip_loader import build_clip_from_state_dict, load_clip, read_state_dict
from crane.models.errors import WeightsNotFoundError
from crane.models.vfm import IMAGENET_MEAN, IMAGENET_STD, VFMS, VisionFoundationModel, load_vfm
from tests.test_model_units import tiny_clip_state_dict

OFFLINE_LIMIT_S = 5.0  # the requirement for a missing-weights failure


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript_archive(state_dict: dict[str, torch.Tensor], path) -> None:
    """Write a TorchScript archive whose ``state_dict()`` has exactly the given keys, like OpenAI's ``.pt``."""
    root = _Holder()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, _Holder())
            module = getattr(module, name)
        module.register_buffer(leaf, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))


@pytest.fixture(scope="module")
def fp16_sd() -> dict[str, torch.Tensor]:
    """Tiny CLIP weights rounded to float16 values (OpenAI distributes fp16), stored as float32."""
    return {k: v.half().float() for k, v in tiny_clip_state_dict(seed=4).items()}


def _outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.randint(1, 49406, (2, 77))
    tokens[:, 10] = 49407
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def _outputs_at(model, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(torch.randn(2, 3, size, size)), model.encode_text(torch.randint(1, 49408, (2, 77)))


def test_clip_sources_give_identical_outputs(tmp_path, fp16_sd):
    from safetensors.torch import save_file

    torch.save(fp16_sd, tmp_path / "clip.pt")
    torch.save(fp16_sd, tmp_path / "pytorch_model.bin")
    torch.save({"state_dict": {f"module.{k}": v for k, v in fp16_sd.items()}}, tmp_path / "wrapped.pth")
    save_file(fp16_sd, str(tmp_path / "clip.safetensors"))
    archive = {k: v.half() if v.is_floating_point() else v for k, v in fp16_sd.items()}
    archive.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    save_torchscript_archive(archive, tmp_path / "ViT-tiny.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # OpenAI's file is TorchScript: no deprecation warning on every run
        assert set(read_state_dict(tmp_path / "ViT-tiny.pt")) == set(archive)

    image_ref, text_ref = _outputs(load_clip(fp16_sd))
    for source in ("clip.pt", "pytorch_model.bin", "wrapped.pth", "clip.safetensors", "ViT-tiny.pt"):
        model = load_clip(tmp_path / source)
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters()), source
        image, text = _outputs(model)
        assert torch.equal(image, image_ref) and torch.equal(text, text_ref), source
    assert _outputs(load_clip(str(tmp_path / "ViT-tiny.pt")))[0].shape == (2, 64)


@pytest.mark.parametrize("vision_width,vision_layers,patch,image_size,text_width,text_layers,embed_dim", [
    (64, 2, 16, 64, 64, 1, 32),
    (192, 3, 14, 56, 128, 2, 96),
    (128, 5, 32, 96, 192, 3, 80),
])
def test_architecture_inferred_from_tensors(vision_width, vision_layers, patch, image_size, text_width,
                                            text_layers, embed_dim):
    sd = tiny_clip_state_dict(vision_width, vision_layers, patch, image_size, text_width, text_layers, embed_dim)
    model = build_clip_from_state_dict(sd)
    v = model.visual
    assert v.conv1.kernel_size == (patch, patch) and v.conv1.out_channels == vision_width
    assert len(v.transformer.resblocks) == vision_layers
    assert v.transformer.resblocks[0].attn.num_heads == vision_width // 64
    assert v.positional_embedding.shape == ((image_size // patch) ** 2 + 1, vision_width)
    assert len(model.transformer.resblocks) == text_layers
    assert model.transformer.resblocks[0].attn.num_heads == text_width // 64
    assert model.text_projection.shape == (text_width, embed_dim)
    loaded = model.state_dict()
    for k, value in sd.items():
        assert torch.equal(loaded[k], value), k
    image, text = _outputs_at(model, image_size)
    assert image.shape == (2, embed_dim) and text.shape == (2, embed_dim)
    assert torch.isfinite(image).all() and torch.isfinite(text).all()


def test_non_clip_files_give_clear_errors(tmp_path):
    text_file = tmp_path / "notes.pt"
    text_file.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="neither a state dict nor a TorchScript archive") as err:
        load_clip(text_file)
    assert str(text_file) in str(err.value)

    resnet = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, resnet)
    with pytest.raises(ValueError, match="not an OpenAI ViT CLIP state dict"):
        load_clip(resnet)
    with pytest.raises(ValueError, match="not an OpenAI ViT CLIP state dict"):
        load_clip({"weight": torch.zeros(3)})

    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listing)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_clip(listing)

    with pytest.raises(WeightsNotFoundError, match="--clip_weights") as err:
        load_clip(tmp_path / "missing.pt")
    assert "missing.pt" in str(err.value)


# --- missing weights offline -------------------------------------------------------------------


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """HOME, HF_HOME, TORCH_HOME and the torch hub directory point at empty folders."""
    import huggingface_hub.constants

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))
    return tmp_path


def _timed_failure(fn, *args) -> tuple[float, str]:
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as err:
        fn(*args)
    return time.perf_counter() - start, str(err.value)


def _assert_clip_hint(message: str) -> None:
    for needle in ("ViT-L-14-336px.pt", "~/.cache/clip/", "--clip_weights", "download_weights.sh"):
        assert needle in message, (needle, message)


def _assert_vfm_hints(cache_root) -> None:
    for name, spec in VFMS.items():
        elapsed, message = _timed_failure(load_vfm, name, None)
        assert elapsed < OFFLINE_LIMIT_S, (name, elapsed)
        for needle in (spec.meta_file, str(cache_root / "torch" / "hub" / "checkpoints"), "--dino_weights"):
            assert needle in message, (name, needle, message)


def test_missing_weights_fail_fast_with_hf_hub_offline(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elapsed, message = _timed_failure(load_clip, "openai")
    assert elapsed < OFFLINE_LIMIT_S, elapsed
    _assert_clip_hint(message)
    elapsed, message = _timed_failure(lambda: crane.Detector.from_config(clip_weights="openai"))
    assert elapsed < OFFLINE_LIMIT_S, elapsed
    _assert_clip_hint(message)
    _assert_vfm_hints(empty_caches)


def test_missing_weights_fail_fast_without_network(empty_caches, monkeypatch):
    """No HF_HUB_OFFLINE, but the hub is unreachable: still a quick, instructive failure."""
    if hub.hub_reachable(timeout=2.0):
        pytest.skip("huggingface.co is reachable here; this test checks the unreachable case")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    elapsed, message = _timed_failure(load_clip, "openai")
    assert elapsed < OFFLINE_LIMIT_S, elapsed
    _assert_clip_hint(message)
    _assert_vfm_hints(empty_caches)


def test_missing_weights_fail_fast_when_name_lookup_hangs(empty_caches, monkeypatch):
    """A resolver that never answers (the socket timeout does not cover it) must not stall the failure."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def hanging_lookup(*args, **kwargs):
        time.sleep(3 * OFFLINE_LIMIT_S)
        raise socket.gaierror("lookup timed out")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    elapsed, message = _timed_failure(load_clip, "openai")
    assert elapsed < OFFLINE_LIMIT_S, elapsed
    _assert_clip_hint(message)


def test_weights_found_in_local_caches(empty_caches, fp16_sd):
    """``"openai"`` finds OpenAI's archive in ~/.cache/clip; VFMs find Meta's files in the torch hub cache."""
    clip_dir = empty_caches / "home" / ".cache" / "clip"
    clip_dir.mkdir(parents=True)
    save_torchscript_archive({k: v.half() for k, v in fp16_sd.items()}, clip_dir / "ViT-L-14-336px.pt")
    image, _ = _outputs(load_clip("openai"))
    assert torch.equal(image, _outputs(load_clip(fp16_sd))[0])

    checkpoints = empty_caches / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    timm_sd = _random_timm("vit_base_patch8_224", seed=0)
    torch.save(timm_sd, checkpoints / VFMS["dino"].meta_file)
    vfm = load_vfm("dino", None, image_size=64)
    assert torch.equal(vfm.model.blocks[3].attn.qkv.weight, timm_sd["blocks.3.attn.qkv.weight"])


# --- vision foundation models ----------------------------------------------------------------------


def _random_timm(name: str, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        for k, v in sd.items():
            if ".ls" in k:  # LayerScale far from its 1e-5 init, so the blocks matter
                v.copy_(0.2 + 0.05 * torch.randn_like(v))
    return sd


def dinov2_to_meta_layout(sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """timm ``vit_base_patch14_reg4_dinov2`` keys -> Meta's ``dinov2_vitb14_reg4_pretrain.pth`` keys:
    ``register_tokens``, ``mask_token``, a class position in ``pos_embed`` (folded into ``cls_token``)."""
    gen = torch.Generator().manual_seed(seed)
    cls_pos = 0.02 * torch.randn(1, 1, sd["pos_embed"].shape[-1], generator=gen)
    meta = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    meta["cls_token"] = sd["cls_token"] - cls_pos
    meta["register_tokens"] = sd["reg_token"]
    meta["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    meta["mask_token"] = torch.zeros(1, sd["pos_embed"].shape[-1])
    return meta


@pytest.fixture(scope="module")
def dinov2_timm_sd() -> dict[str, torch.Tensor]:
    return _random_timm("vit_base_patch14_reg4_dinov2", seed=1, img_size=518)


def _clip_normalised(n: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=gen)
    return (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def test_dinov2_meta_layout_matches_timm_layout(tmp_path, dinov2_timm_sd):
    meta = dinov2_to_meta_layout(dinov2_timm_sd)
    assert meta["pos_embed"].shape == (1, 1 + 37 * 37, 768) and "blocks.11.ls1.gamma" in meta
    torch.save(meta, tmp_path / "dinov2_vitb14_reg4_pretrain.pth")
    torch.save(dinov2_timm_sd, tmp_path / "timm.pt")
    images = _clip_normalised(2, 112)
    with torch.no_grad():
        from_meta = load_vfm("dinov2", tmp_path / "dinov2_vitb14_reg4_pretrain.pth", image_size=112)(images)
        from_timm = load_vfm("dinov2", tmp_path / "timm.pt", image_size=112)(images)
        from_dict = load_vfm("dinov2", dinov2_timm_sd, image_size=112)(images)
    assert from_meta.shape == (2, 768, 8, 8)
    torch.testing.assert_close(from_meta, from_timm, atol=1e-5, rtol=0)
    assert torch.equal(from_timm, from_dict)


def test_dinov2_features_are_normed_last_layer_on_imagenet_input(dinov2_timm_sd):
    """Input: CLIP normalisation undone, clamped to [0, 1], ImageNet normalisation; output: last block, final norm."""
    vfm = load_vfm("dinov2", dinov2_timm_sd, image_size=56)
    images = _clip_normalised(1, 56) * 1.5  # some values leave [0, 1] once un-normalised
    pixels = (images * torch.tensor(OPENAI_STD).view(1, 3, 1, 1) + torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)).clamp(0, 1)
    x = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    m = vfm.model
    with torch.no_grad():
        tokens = m.norm(m.blocks(m._pos_embed(m.patch_embed(x))))[:, m.num_prefix_tokens:]
        expected = tokens.reshape(1, 4, 4, 768).permute(0, 3, 1, 2)
        torch.testing.assert_close(vfm(images), expected, atol=1e-5, rtol=0)


def test_dino_v1_loads_from_file(tmp_path):
    sd = _random_timm("vit_base_patch8_224", seed=2)
    assert sd["pos_embed"].shape == (1, 1 + 28 * 28, 768)  # the layout of Meta's dino_vitbase8_pretrain.pth
    path = tmp_path / "dino_vitbase8_pretrain.pth"
    torch.save(sd, path)
    vfm = load_vfm("dino", path, image_size=64)
    assert vfm.beta == 1.2
    assert torch.equal(vfm.model.blocks[5].mlp.fc1.weight, sd["blocks.5.mlp.fc1.weight"])
    with torch.no_grad():
        feats = vfm(_clip_normalised(2, 64))
    assert feats.shape == (2, 768, 8, 8) and torch.isfinite(feats).all()


def sam_to_meta_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``samvit_base_patch16`` keys -> the image encoder of Meta's ``sam_vit_b_01ec64.pth``
    (``image_encoder.`` prefix, ``mlp.lin1/lin2``) plus a prompt-encoder/mask-decoder entry to be ignored."""
    meta = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in sd.items()}
    meta["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.zeros(2, 128)
    meta["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    return meta


def test_sam_loads_from_meta_file(tmp_path, monkeypatch):
    """SAM ViT-B from Meta's layout (``~`` expanded). Its 1024x1024 forward takes ~40 s on this CPU, so the
    feature call runs the loaded encoder through the same wrapper at 256x256 (positions resized by timm)."""
    sd = _random_timm("samvit_base_patch16", seed=3)
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(sam_to_meta_layout(sd), tmp_path / "sam_vit_b_01ec64.pth")
    vfm = load_vfm("sam", "~/sam_vit_b_01ec64.pth")
    assert vfm.beta == 1.08 and vfm.spec.fixed_input == 1024
    loaded = vfm.model.state_dict()
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k
    small = VisionFoundationModel("sam", vfm.model, dataclasses.replace(vfm.spec, fixed_input=256))
    with torch.no_grad():
        feats = small(_clip_normalised(1, 112))
    assert feats.shape == (1, 256, 16, 16) and torch.isfinite(feats).all()


def test_vfm_errors():
    with pytest.raises(ValueError, match="unknown dino_model"):
        load_vfm("clip", None)
    with pytest.raises(WeightsNotFoundError, match="--dino_weights"):
        load_vfm("dinov2", "/nonexistent/dinov2.pth")
    sd = _random_timm("vit_base_patch8_224", seed=0)
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"do not fit .*blocks\.0\.attn\.qkv\.weight \(3, 3\) vs \(2304, 768\)"):
        load_vfm("dino", sd, image_size=64)
    with pytest.raises(ValueError, match=r"do not fit .*missing \['blocks\.0"):
        load_vfm("dino", {k: v for k, v in sd.items() if not k.startswith("blocks.0.")}, image_size=64)
