"""The training augmentation of the published code (``--aug_rate``): a 2 x 2 mosaic.

With probability ``aug_rate`` a training sample is replaced by four random images
of its class pasted into a 2 x 2 grid, with their masks pasted the same way
(``combine_img`` of the APRIL-GAN / AnomalyCLIP dataset code that Crane builds
on). As published, such a sample is labelled anomalous whatever the four
images are.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from crane.data.image import ImageInput, load_rgb


def mosaic(images: Sequence[ImageInput], masks: Sequence[Optional[ImageInput]]) -> tuple[Image.Image, Image.Image]:
    """Paste four images (and masks; ``None``: normal) into a 2 x 2 grid of cells the size of the first image.

    Returns the RGB mosaic and its ``L`` mask (0/255), both ``2W x 2H``. Like PIL's
    ``paste`` in the published code, an image of another size is anchored at its
    cell's corner and cropped (or leaves black) where it does not fit.
    """
    if len(images) != 4 or len(masks) != 4:
        raise ValueError(f"a mosaic takes 4 images and 4 masks, got {len(images)} and {len(masks)}")
    tiles = [Image.fromarray(load_rgb(img)) for img in images]
    width, height = tiles[0].size
    out_image = Image.new("RGB", (2 * width, 2 * height))
    out_mask = Image.new("L", (2 * width, 2 * height))
    for i, (tile, mask) in enumerate(zip(tiles, masks)):
        corner = ((i % 2) * width, (i // 2) * height)
        out_image.paste(tile, corner)
        if mask is not None and not (isinstance(mask, str) and not mask):
            out_mask.paste(_binary_mask(mask, tile.size), corner)
    return out_image, out_mask


def _binary_mask(mask: ImageInput, size: tuple[int, int]) -> Image.Image:
    """Any non-zero pixel -> 255, at the mask's own resolution (resized to ``size`` if it differs)."""
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask)
    elif isinstance(mask, np.ndarray):
        arr = mask
    else:
        with Image.open(os.fspath(mask)) as img:
            arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    binary = Image.fromarray(((arr > 0) * 255).astype(np.uint8), mode="L")
    return binary if binary.size == size else binary.resize(size, Image.NEAREST)
