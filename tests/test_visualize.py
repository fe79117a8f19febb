"""Anomaly panels: layout, colours on the fixed [0, 1] scale, outlines, atomic PNG writing."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from crane.inspection.visualize import (FONT, GAP, GROUND_TRUTH, MAX_TILE, MIN_TILE, PREDICTED, TITLES, WIDEST_LEGEND,
                                       heat_colors, panel_layout, render_panel, save_panel)


def _square_map(size: int = 64, lo: float = 0.1, hi: float = 0.9) -> np.ndarray:
    """``size x size`` map: ``lo`` everywhere, ``hi`` in the square of rows/cols [size/4, size/2)."""
    amap = np.full((size, size), lo, np.float32)
    amap[size // 4:size // 2, size // 4:size // 2] = hi
    return amap


def _count(tile: np.ndarray, color: tuple[int, int, int]) -> int:
    return int(np.all(tile == np.array(color, np.uint8), axis=-1).sum())


@pytest.mark.parametrize("height,width", [(100, 300), (300, 100), (1000, 1500), (256, 256)])
def test_layout_keeps_aspect_and_clamps_tile_height(height, width):
    image = np.full((height, width, 3), 120, np.uint8)
    panel = render_panel(image, _square_map())
    layout = panel_layout(height, width)
    assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[2] == 3
    assert layout.tile_h == min(max(height, MIN_TILE), MAX_TILE)
    assert abs(layout.tile_w / layout.tile_h - width / height) < 1.0 / layout.tile_h + 1e-9
    assert panel.shape[1] == layout.width >= layout.lefts[2] + layout.tile_w + GAP
    assert panel.shape[0] > layout.top + layout.tile_h
    original = layout.tile(panel, 0)
    assert original.shape[:2] == (layout.tile_h, layout.tile_w)
    assert np.all(original == 120)  # the original tile is the (uniform) image itself


def test_heat_map_tile_uses_the_fixed_probability_scale():
    image = np.zeros((64, 64, 3), np.uint8)
    layout = panel_layout(64, 64)
    for value in (0.0, 0.3, 1.0):
        heat = layout.tile(render_panel(image, np.full((32, 32), value, np.float32)), 1)
        assert np.all(heat == heat_colors(np.float32(value)))  # not min-max normalised per image
    jet = cv2.applyColorMap(np.array([[0, 128, 255]], np.uint8), cv2.COLORMAP_JET)[0, :, ::-1]
    assert np.array_equal(heat_colors(np.array([-1.0, 128 / 255, 7.0])), jet)  # clipped to [0, 1]


def test_predicted_region_is_outlined_only_with_a_threshold():
    image = np.full((200, 200, 3), 90, np.uint8)
    amap = _square_map(64)
    layout = panel_layout(200, 200)
    without = layout.tile(render_panel(image, amap), 2)
    assert _count(without, PREDICTED) == 0
    overlay = layout.tile(render_panel(image, amap, threshold=0.5), 2)
    ys, xs = np.nonzero(np.all(overlay == np.array(PREDICTED, np.uint8), axis=-1))
    assert len(ys) > 0
    # The outline follows the square [1/4, 1/2) of the tile (bilinear resize moves the edge by < 1 map pixel).
    side = layout.tile_h
    margin = side / 64 * 2 + 4
    assert ys.min() > side / 4 - margin and ys.max() < side / 2 + margin
    assert xs.min() > side / 4 - margin and xs.max() < side / 2 + margin
    # Nothing is outlined when no value reaches the threshold.
    assert _count(layout.tile(render_panel(image, amap, threshold=0.95), 2), PREDICTED) == 0


def test_ground_truth_outline_in_its_own_colour():
    image = np.full((128, 256, 3), 90, np.uint8)
    gt = np.zeros((128, 256), np.uint8)
    gt[80:110, 180:230] = 255
    layout = panel_layout(128, 256)
    assert _count(layout.tile(render_panel(image, _square_map()), 2), GROUND_TRUTH) == 0
    overlay = layout.tile(render_panel(image, _square_map(), gt_mask=gt), 2)
    ys, xs = np.nonzero(np.all(overlay == np.array(GROUND_TRUTH, np.uint8), axis=-1))
    scale = layout.tile_h / 128
    assert len(ys) > 0
    assert ys.min() >= 80 * scale - 4 and ys.max() <= 110 * scale + 4
    assert xs.min() >= 180 * scale - 4 and xs.max() <= 230 * scale + 4


def test_score_and_caption_change_the_header_only():
    image = np.full((64, 64, 3), 90, np.uint8)
    plain = render_panel(image, _square_map())
    labelled = render_panel(image, _square_map(), score=0.75, caption="part.png | anomalous")
    layout = panel_layout(64, 64)
    assert plain.shape == labelled.shape
    assert not np.array_equal(plain[:layout.top], labelled[:layout.top])
    assert np.array_equal(plain[layout.top:], labelled[layout.top:])


@pytest.mark.parametrize("height,width", [(900, 120), (300, 60), (2000, 100), (256, 20)])
def test_portrait_panels_keep_their_caption_and_labels_whole(height, width):
    """A tall, narrow image: the caption wraps instead of being cut, titles and legend fit their columns."""
    image = np.full((height, width, 3), 120, np.uint8)
    caption = "bottle/test/broken_large/a_rather_long_file_name_000.png | anomalous"
    header = f"{caption} | score 0.1230"
    panel = render_panel(image, _square_map(), 0.5, np.ones((height, width)), 0.123, caption=caption)
    layout = panel_layout(height, width, header)
    assert panel.shape[1] == layout.width
    assert len(layout.header) > 1  # wrapped: a panel of narrow tiles is narrower than the caption
    assert "".join(layout.header).replace(" ", "") == header.replace(" ", "")  # nothing left out
    for line in layout.header:
        assert cv2.getTextSize(line, FONT, layout.scale, 1)[0][0] <= layout.width - 2 * GAP
    for text, swatch in [(t, False) for t in TITLES] + list(WIDEST_LEGEND):
        indent = layout.text_h + 6 if swatch else 0
        assert cv2.getTextSize(text, FONT, layout.scale, 1)[0][0] + indent <= layout.column_w, text
    assert np.all(panel[:, -GAP // 2:] == 255)  # no text runs into the right edge
    original = layout.tile(panel, 0)
    assert original.shape[:2] == (layout.tile_h, layout.tile_w) and np.all(original == 120)


def test_save_panel_writes_the_rendered_png_atomically(tmp_path):
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    path = tmp_path / "nested" / "panel.png"
    save_panel(path, image, _square_map(), 0.5, np.ones((50, 70)), 0.9)
    written = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]
    assert np.array_equal(written, render_panel(image, _square_map(), 0.5, np.ones((50, 70)), 0.9))
    assert sorted(p.name for p in path.parent.iterdir()) == ["panel.png"]


@pytest.mark.parametrize("image,amap", [
    (np.zeros((10, 10), np.uint8), np.zeros((8, 8))),
    (np.zeros((10, 10, 3), np.float32), np.zeros((8, 8))),
    (np.zeros((10, 10, 3), np.uint8), np.zeros((1, 8, 8))),
])
def test_bad_inputs_are_rejected(image, amap):
    with pytest.raises(ValueError):
        render_panel(image, amap)
