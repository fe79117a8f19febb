"""Anomaly panels: original | heat map | overlay, as one PNG per image.

Layout (white background)::

    caption / score line
    [ original ] [ heat map ] [ overlay ]
                 [colour bar] [ legend  ]

* Every tile shows the whole image at its own aspect ratio, scaled so that its
  height is between ``MIN_TILE`` and ``MAX_TILE`` pixels; the anomaly map (square,
  model resolution) is resized back to the image's aspect with bilinear
  interpolation, which inverts the square resize of the CLIP preprocessing.
* Each tile sits centred in a column at least as wide as its title and legend, so a
  portrait image (a narrow tile) keeps every label whole; the caption line wraps
  onto as many lines as it needs.
* Heat map colours: OpenCV's JET colormap on a **fixed [0, 1] scale** (anomaly maps
  are probabilities), so colours mean the same in every panel: dark blue 0,
  green 0.5, dark red 1. The colour bar under the tile marks the pixel threshold.
* Overlay: the image blended 50/50 with the heat map; the predicted region
  (``map >= threshold``) is outlined in white, the ground-truth region (when given)
  in green; both lines have a dark edge so they stay visible on any colour.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from crane.files import write_bytes

MIN_TILE = 256
MAX_TILE = 640
GAP = 8
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
PREDICTED = (255, 255, 255)
GROUND_TRUTH = (0, 220, 0)
EDGE = (0, 0, 0)
FONT = cv2.FONT_HERSHEY_SIMPLEX


TITLES = ("original", "anomaly map (0-1 scale)", "overlay")
WIDEST_LEGEND = (("no pixel threshold: no outline", False), ("white: map >= 0.000", True),
                 ("green: ground truth", True))
"""The legend lines a column must hold whole (text, whether a colour swatch precedes it)."""


@dataclass(frozen=True)
class PanelLayout:
    """Where the parts of a panel are: three columns ``column_w`` wide, each holding a ``tile_h x tile_w``
    tile (centred) at row ``top`` and columns ``lefts``, under the ``header`` lines; ``width`` in all."""

    tile_h: int
    tile_w: int
    top: int
    lefts: tuple[int, int, int]
    scale: float  # font scale
    text_h: int  # height of one text line
    column_w: int
    width: int
    header: tuple[str, ...]

    def tile(self, panel: np.ndarray, index: int) -> np.ndarray:
        """View of tile ``index`` (0 original, 1 heat map, 2 overlay) of a rendered ``panel``."""
        left = self.lefts[index]
        return panel[self.top:self.top + self.tile_h, left:left + self.tile_w]

    def column(self, index: int) -> int:
        """Left edge of column ``index`` (where its title and legend start)."""
        return GAP + index * (self.column_w + GAP)


def _text_w(text: str, scale: float) -> int:
    return cv2.getTextSize(text, FONT, scale, 1)[0][0]


def _wrap(text: str, width: int, scale: float) -> list[str]:
    """``text`` in lines of at most ``width`` pixels at ``scale``: broken at spaces, and a word wider than a
    line (a long path) broken where it must be; nothing is left out."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if _text_w(candidate, scale) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = word
        while _text_w(line, scale) > width and len(line) > 1:
            cut = len(line) - 1
            while cut > 1 and _text_w(line[:cut], scale) > width:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    if line:
        lines.append(line)
    return lines


def panel_layout(height: int, width: int, header: str = "") -> PanelLayout:
    """Layout of the panel of an ``height x width`` image, with the ``header`` text above the tiles.

    Tiles keep the image's aspect ratio with their height clamped to [MIN_TILE, MAX_TILE]; columns
    are as wide as the tiles, or as the titles and legend where those are wider.
    """
    tile_h = int(min(max(height, MIN_TILE), MAX_TILE))
    tile_w = max(1, round(width * tile_h / height))
    scale = 0.45 * max(1.0, tile_h / 320)
    text_h = int(22 * scale / 0.45)
    labels = [_text_w(t, scale) for t in TITLES]
    labels += [_text_w(t, scale) + (text_h + 6 if swatch else 0) for t, swatch in WIDEST_LEGEND]
    column_w = max(tile_w, max(labels) + 2)
    panel_w = 4 * GAP + 3 * column_w
    lines = tuple(_wrap(header, panel_w - 2 * GAP, scale)) if header else ()
    lefts = tuple(GAP + i * (column_w + GAP) + (column_w - tile_w) // 2 for i in range(3))
    return PanelLayout(tile_h, tile_w, max(1, len(lines)) * text_h + GAP, lefts, scale, text_h, column_w, panel_w,
                       lines)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """JET colours (RGB uint8, ``... x 3``) of values on the fixed [0, 1] scale (clipped, NaN as 0)."""
    levels = np.round(np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)
    bgr = cv2.applyColorMap(levels.reshape(1, -1), cv2.COLORMAP_JET)
    return np.ascontiguousarray(bgr[..., ::-1]).reshape(*levels.shape, 3)


def _outline(canvas: np.ndarray, region: np.ndarray, color: tuple[int, int, int], width: int) -> None:
    """Draw the outline of the boolean ``region`` onto ``canvas`` (RGB) with a dark edge."""
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if contours:
        cv2.drawContours(canvas, contours, -1, EDGE, width + 2, lineType=cv2.LINE_AA)
        cv2.drawContours(canvas, contours, -1, color, width, lineType=cv2.LINE_AA)


def _text(canvas: np.ndarray, text: str, x: int, y: int, scale: float, color=TEXT) -> None:
    cv2.putText(canvas, text, (x, y), FONT, scale, color, 1, lineType=cv2.LINE_AA)


def _fit(text: str, width: int, scale: float) -> str:
    """``text`` shortened from the left with '...' so it fits ``width`` pixels at ``scale``."""
    if cv2.getTextSize(text, FONT, scale, 1)[0][0] <= width:
        return text
    while len(text) > 4 and cv2.getTextSize("..." + text, FONT, scale, 1)[0][0] > width:
        text = text[1:]
    return "..." + text


def _colour_bar(width: int, threshold: Optional[float], scale: float) -> np.ndarray:
    """A horizontal JET bar for [0, 1] with tick labels and the threshold marked: ``h x width x 3``."""
    label_h = int(22 * scale / 0.45)
    bar_h = max(12, label_h // 2)
    strip = np.full((bar_h + label_h + 6, width, 3), BACKGROUND, np.uint8)
    strip[2:2 + bar_h] = heat_colors(np.linspace(0.0, 1.0, width, dtype=np.float32))[None]
    for value, label in ((0.0, "0"), (0.5, "0.5"), (1.0, "1")):
        x = int(round(value * (width - 1)))
        size = cv2.getTextSize(label, FONT, scale, 1)[0][0]
        _text(strip, label, min(max(0, x - size // 2), width - size), 2 + bar_h + label_h - 4, scale)
    if threshold is not None and 0.0 <= threshold <= 1.0:
        x = int(round(threshold * (width - 1)))
        cv2.line(strip, (x, 0), (x, bar_h + 3), EDGE, 3)
        cv2.line(strip, (x, 0), (x, bar_h + 3), PREDICTED, 1)
    return strip


def render_panel(image_rgb: np.ndarray, anomaly_map: np.ndarray, threshold: Optional[float] = None,
                 gt_mask: Optional[np.ndarray] = None, score: Optional[float] = None, *,
                 caption: Optional[str] = None) -> np.ndarray:
    """The panel as an RGB uint8 array ``H' x W' x 3``.

    Args:
        image_rgb: ``H x W x 3`` uint8, the original image.
        anomaly_map: ``S x S`` (any ``h x w``) float anomaly probabilities in [0, 1].
        threshold: pixel threshold; the region ``map >= threshold`` is outlined. ``None``: no outline.
        gt_mask: optional ground truth, any ``h x w`` (non-zero = anomalous); outlined in green.
        score: optional image score, printed in the header.
        caption: optional text (e.g. file name, decision) printed before the score.
    """
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"image_rgb must be H x W x 3 uint8, got {image_rgb.shape} {image_rgb.dtype}")
    anomaly_map = np.asarray(anomaly_map, np.float32)
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D (S x S), got shape {anomaly_map.shape}")
    header = " | ".join(part for part in (caption, None if score is None else f"score {score:.4f}") if part)
    layout = panel_layout(*image_rgb.shape[:2], header)
    th, tw, scale, text_h = layout.tile_h, layout.tile_w, layout.scale, layout.text_h
    interpolation = cv2.INTER_AREA if image_rgb.shape[0] > th else cv2.INTER_CUBIC
    original = cv2.resize(image_rgb, (tw, th), interpolation=interpolation)
    amap = cv2.resize(anomaly_map, (tw, th), interpolation=cv2.INTER_LINEAR)
    heat = heat_colors(amap)
    overlay = cv2.addWeighted(original, 0.5, heat, 0.5, 0.0)
    line = max(2, th // 128)
    if gt_mask is not None:
        gt = cv2.resize((np.asarray(gt_mask) > 0).astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST) > 0
        _outline(overlay, gt, GROUND_TRUTH, line)
    if threshold is not None:
        _outline(overlay, amap >= threshold, PREDICTED, line)

    cw = layout.column_w
    bar = _colour_bar(cw, threshold, scale)
    below = layout.top + th + GAP
    canvas = np.full((below + text_h + bar.shape[0] + 2 * GAP, layout.width, 3), BACKGROUND, np.uint8)
    for k, text in enumerate(layout.header):
        _text(canvas, text, GAP, (k + 1) * text_h, scale)
    for i, (tile, title) in enumerate(zip((original, heat, overlay), TITLES)):
        layout.tile(canvas, i)[:] = tile
        _text(canvas, _fit(title, cw, scale), layout.column(i), below + text_h - 6, scale)
    x_heat, x_over = layout.column(1), layout.column(2)
    canvas[below + text_h:below + text_h + bar.shape[0], x_heat:x_heat + cw] = bar
    legend = [(f"white: map >= {threshold:.3g}", PREDICTED) if threshold is not None
              else ("no pixel threshold: no outline", None)]
    if gt_mask is not None:
        legend.append(("green: ground truth", GROUND_TRUTH))
    for j, (label, color) in enumerate(legend):
        y = below + text_h + j * text_h + text_h // 2
        swatch_w, swatch_h, mid = text_h, max(6, text_h // 3), y - text_h // 3
        if color is not None:
            cv2.rectangle(canvas, (x_over, mid - swatch_h // 2), (x_over + swatch_w, mid + swatch_h // 2), EDGE, -1)
            cv2.rectangle(canvas, (x_over + 1, mid - swatch_h // 2 + 1), (x_over + swatch_w - 1, mid + swatch_h // 2 - 1),
                          color, -1)
        indent = swatch_w + 6 if color is not None else 0
        _text(canvas, _fit(label, cw - indent, scale), x_over + indent, y, scale)
    return canvas


def write_png(path: Union[str, os.PathLike], image: np.ndarray) -> None:
    """Write an RGB (``H x W x 3``) or gray (``H x W``) uint8 array as PNG atomically (:mod:`crane.files`)."""
    path = Path(path)
    array = image[..., ::-1] if image.ndim == 3 else image
    ok, data = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise OSError(f"cannot encode PNG for {path}")
    write_bytes(path, data.tobytes())


def save_panel(path: Union[str, os.PathLike], image_rgb: np.ndarray, anomaly_map: np.ndarray,
               threshold: Optional[float] = None, gt_mask: Optional[np.ndarray] = None,
               score: Optional[float] = None, *, caption: Optional[str] = None) -> None:
    """Render the panel (see :func:`render_panel`) and write it to ``path`` as PNG, atomically."""
    write_png(path, render_panel(image_rgb, anomaly_map, threshold, gt_mask, score, caption=caption))
