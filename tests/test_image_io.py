"""Masks binarised as the published loader does (``convert("L") > 0``), the published preprocessing order,
and what ``crane.checkpoints`` knows about the 20 official checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crane.checkpoints import CRANE, CRANE_PLUS, OFFICIAL, CheckpointError, apply_settings, read_checkpoint
from crane.data.image import load_mask, preprocess
from tests.conftest import REPO


def _published_mask(path, size: int) -> np.ndarray:
    """The published loader: ``convert('L') > 0``, 0/255, PIL bilinear resize, threshold 0.5."""
    binary = np.array(Image.open(path).convert("L")) > 0
    resized = Image.fromarray(binary.astype(np.uint8) * 255, mode="L").resize((size, size), Image.BILINEAR)
    return (np.asarray(resized) / 255.0 > 0.5).astype(np.float32)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "1"])
def test_masks_are_binarised_as_published(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = np.zeros((20, 24, 3), np.uint8)
    rgb[4:10, 5:12] = 255
    rgb[12:15, 2:6] = (0, 0, 1)  # luminance rounds to 0: not anomalous for the published loader
    rgb[15:18, 14:20] = rng.integers(1, 255, (3, 6, 3))
    image = Image.fromarray(rgb)
    if mode in ("RGBA", "LA"):
        image = image.convert(mode)  # opaque alpha everywhere: must not make the mask all-anomalous
    elif mode != "RGB":
        image = image.convert(mode)
    path = tmp_path / f"mask_{mode}.png"
    image.save(path)
    ours = load_mask(path, 16).numpy()
    np.testing.assert_array_equal(ours, _published_mask(path, 16))
    assert 0 < ours.mean() < 0.5


def test_published_preprocessing_resizes_in_the_files_mode(tmp_path):
    rgb = (np.random.default_rng(1).random((30, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    for name in ("rgb.png", "gray.png"):  # the 14 datasets' formats: both orders agree
        np.testing.assert_array_equal(preprocess(tmp_path / name, 28).numpy(),
                                      preprocess(tmp_path / name, 28, "published").numpy())
    deep = (np.random.default_rng(2).random((30, 40)) * 65535).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    ours, published = preprocess(tmp_path / "deep.png", 28), preprocess(tmp_path / "deep.png", 28, "published")
    assert (ours - published).abs().max() > 0.5  # published: 16-bit values saturate in convert("RGB")


def test_the_official_checkpoints_are_known_by_their_sums(tmp_path):
    assert len(OFFICIAL) == 20
    for sha, official in OFFICIAL.items():
        state, info = read_checkpoint(REPO / "checkpoints" / official.relpath)
        assert info.sha256 == sha and info.official == official and len(state) == 16
        assert info.settings == (CRANE_PLUS if official.run_name.endswith("cranep") else CRANE)
    options = type("Options", (), {"dino_model": "dinov2", "features_list": [24], "soft_mean": False})()
    _, crane = read_checkpoint(REPO / "checkpoints" / "trained_on_visa_crane" / "epoch_5.pth")
    assert apply_settings(options, set(), crane) == []
    assert (options.dino_model, options.features_list, options.soft_mean) == ("none", [6, 12, 18, 24], True)
    with pytest.raises(CheckpointError, match="--features_list 24 contradicts"):
        apply_settings(type("O", (), {"features_list": [24]})(), {"features_list"}, crane)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a torch file"):
        read_checkpoint(tmp_path / "notes.txt")
