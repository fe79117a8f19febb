"""The ``--aug_rate`` augmentation of the published ``train.py``: a 2 x 2 mosaic of one class.

What the published loader does per training sample, reproduced here:

* it draws one uniform number ``u`` (every sample, whatever ``aug_rate``); when
  ``aug_rate > u`` and the sample's class is one of :data:`MOSAIC_CLASSES`, the sample
  is replaced by a mosaic (samples of other classes never are);
* one status for all four tiles: normal with weight 0.8, anomalous with weight 0.2;
  then four samples of the class with that status, drawn with replacement;
* the four images are pasted, unresized, into a 2 x 2 grid of cells the size of the
  first one (their masks likewise; normal tiles have none);
* the mosaic is anomalous exactly when its mask has a non-zero pixel.

:func:`draw_mosaic` makes those draws from a ``random.Random`` in the published
order; :func:`mosaic` builds the image and mask. Where the published draws come from
(one generator per DataLoader worker) is decided by :mod:`crane.engine.train`.
"""
from __future__ import annotations

import os
import random
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from crane.data.image import ImageInput
from crane.errors import CraneError

MOSAIC_CLASSES = ("hazelnut", "pill", "zipper", "bottle", "screw", "metal_nut", "cable")
"""Published quirk: the only class names the mosaic applies to (MVTec AD names)."""
STATUSES = ("normal", "abnormal")
STATUS_WEIGHTS = (0.8, 0.2)


class MosaicPoolError(CraneError):
    """A mosaic drew a status of which its class has no sample (the published loader fails there too)."""


def draw_mosaic(rng: random.Random, cls_name: str, pools: Mapping[str, Sequence[int]], aug_rate: float
                ) -> Optional[list[int]]:
    """Consume ``rng`` as the published loader does for one sample of class ``cls_name``.

    ``pools``: sample indices of the class by status (``"normal"``, ``"abnormal"``), in the
    order of the training set. Returns the four tile indices, or ``None`` when the sample
    stays as it is.
    """
    u = rng.random()
    if not (aug_rate > u and cls_name in MOSAIC_CLASSES):
        return None
    status = rng.choices(STATUSES, weights=STATUS_WEIGHTS)[0]
    pool = pools.get(status, ())
    if not pool:
        raise MosaicPoolError(f"the --aug_rate mosaic of class {cls_name!r} drew {status} tiles, but the class has "
                              f"no {status} sample in the training set (the published code stops here too); "
                              "lower --aug_rate to 0 or keep samples of both kinds (--k_shot/--portion)")
    return [rng.choice(pool) for _ in range(4)]


def _open(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    return Image.open(os.fspath(image))


def _binary(mask: ImageInput) -> Image.Image:
    """``convert("L") > 0`` as 0/255 ``L``, at the mask's own size."""
    arr = np.asarray(_open(mask).convert("L")) > 0
    return Image.fromarray(arr.astype(np.uint8) * 255)


def mosaic(images: Sequence[ImageInput], masks: Sequence[Optional[ImageInput]]
           ) -> tuple[Image.Image, Image.Image, bool]:
    """Paste four images and their masks (``None`` or ``""``: normal) into a 2 x 2 grid.

    Cells are the size ``W x H`` of the first image; tiles are pasted at their cell's corner
    with PIL's ``paste`` as they are (another size is cropped or leaves black; another mode
    is converted by ``paste``). Returns the ``2W x 2H`` RGB image, its ``L`` mask (0/255) and
    whether the mask has any non-zero pixel (the mosaic's label).
    """
    if len(images) != 4 or len(masks) != 4:
        raise ValueError(f"a mosaic takes 4 images and 4 masks, got {len(images)} and {len(masks)}")
    tiles = [_open(image) for image in images]
    width, height = tiles[0].size
    out_image = Image.new("RGB", (2 * width, 2 * height))
    out_mask = Image.new("L", (2 * width, 2 * height))
    for i, (tile, mask) in enumerate(zip(tiles, masks)):
        corner = ((i % 2) * width, (i // 2) * height)
        out_image.paste(tile, corner)
        if mask is not None and not (isinstance(mask, str) and not mask):
            out_mask.paste(_binary(mask), corner)
    return out_image, out_mask, bool(np.asarray(out_mask).any())
