"""Medical sets with layouts of their own: brainmri, br35h, tn3k, cvc-colondb, cvc-clinicdb.

(headct and isic use the MVTec layout, see ``datasets.mvtec_like``.) All of them
are test-only: the train split of their ``meta.json`` is empty.

- brainmri: ``ROOT/brain_tumor_dataset/{no,yes}/*``, class ``brain``; ``no`` normal,
  ``yes`` anomalous; image only.
- br35h: ``ROOT/brain/{no,yes}/*``, same. Assumption: the Br35H archive itself
  unpacks ``no/``, ``yes/`` (and the unlabelled ``pred/``, not read) at its top;
  put ``no/`` and ``yes/`` under ``brain/`` as datasets.md lays out.
- tn3k: ``ROOT/test-image/*`` with masks ``ROOT/test-mask/*`` of the same stem,
  class ``thyroid``, all anomalous (``trainval-*`` folders are not read).
- cvc-colondb, cvc-clinicdb: ``ROOT/images/*`` with masks ``ROOT/masks/*`` of the
  same stem (any image extension, as in the usual PNG conversion; the original
  ClinicDB ``Original/`` and ``Ground Truth/`` TIFF folders must be renamed),
  class ``colon``, all anomalous.

Normal samples get ``specie_name`` ``good``, anomalous ones ``anomaly``.
"""
from __future__ import annotations

from pathlib import Path

from datasets.common import Meta, build_meta, find_mask, image_files, missing_mask, require_dir, sample, stem_index


def no_yes(root: Path, folder: str, cls_name: str) -> Meta:
    """Image-only set with normal images in ``folder/no`` and anomalous ones in ``folder/yes``."""
    test = []
    for label, anomaly, what in (("no", 0, "normal images"), ("yes", 1, "anomalous images")):
        images = image_files(require_dir(root / folder / label, root, what))
        test += [sample(root, p, None, cls_name, "anomaly" if anomaly else "good", anomaly) for p in images]
    return build_meta(root, [], test)


def image_mask_folders(root: Path, images: str, masks: str, cls_name: str) -> Meta:
    """All-anomalous set: every image in ``images`` has the mask of the same stem in ``masks``."""
    mask_dir = require_dir(root / masks, root, "masks")
    index = stem_index(image_files(mask_dir), root)
    test = []
    for image in image_files(require_dir(root / images, root, "images")):
        mask = find_mask(image, index, ("",))
        if mask is None:
            raise missing_mask(image, mask_dir, ("",), root)
        test.append(sample(root, image, mask, cls_name, "anomaly", 1))
    return build_meta(root, [], test)
