"""Write a dataset folder's ``meta.json`` from its files as the archive unpacks.

Usage::

    python -m datasets.generate NAME ROOT

NAME is a dataset key (mvtec visa mpdd btad sdd dtd dagm headct brainmri br35h
isic tn3k cvc-colondb cvc-clinicdb) or ``custom``; ROOT is the dataset folder.
Every defect image is paired with its mask by name, every image and mask is
opened, then ``ROOT/meta.json`` is written atomically and a per-class count
table printed. On a problem it prints one line naming the file and the fix and
exits with status 1. The layout each key expects is described in the module
that reads it: ``datasets.mvtec_like``, ``datasets.visa``, ``datasets.dagm``,
``datasets.medical`` and ``datasets.custom``.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import MappingProxyType

from crane.data.dataset import DatasetError
from datasets import custom, dagm, medical, mvtec_like, visa
from datasets.common import Meta, check_files, count_table, write_meta

GENERATORS: MappingProxyType[str, Callable[[Path], Meta]] = MappingProxyType({
    **{name: partial(mvtec_like.generate, layout=layout) for name, layout in mvtec_like.LAYOUTS.items()},
    "visa": visa.generate,
    "dagm": dagm.generate,
    "brainmri": partial(medical.no_yes, folder="brain_tumor_dataset", cls_name="brain"),
    "br35h": partial(medical.no_yes, folder="brain", cls_name="brain"),
    "tn3k": partial(medical.image_mask_folders, images="test-image", masks="test-mask", cls_name="thyroid"),
    "cvc-colondb": partial(medical.image_mask_folders, images="images", masks="masks", cls_name="colon"),
    "cvc-clinicdb": partial(medical.image_mask_folders, images="images", masks="masks", cls_name="colon"),
    "custom": custom.generate,
})


def generate(name: str, root: str | os.PathLike[str]) -> Meta:
    """List, pair and check dataset ``name`` in ``root``, write ``root/meta.json`` and return its content.

    Raises ``DatasetError`` (one line naming the file and the fix) on any problem;
    ``meta.json`` is then left as it was.
    """
    if name not in GENERATORS:
        raise DatasetError(f"unknown dataset {name!r}; use one of {', '.join(sorted(GENERATORS))}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}; pass the folder the {name} archive unpacked to")
    try:
        meta = GENERATORS[name](root)
        check_files(root, meta)
        write_meta(root, meta)
    except DatasetError as e:
        raise DatasetError(f"{name} dataset in {root}: {e}") from None
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m datasets.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(GENERATORS), metavar="NAME",
                        help=f"dataset key: {' '.join(sorted(GENERATORS))}")
    parser.add_argument("root", type=Path, metavar="ROOT", help="the dataset folder (where the archive unpacked)")
    args = parser.parse_args(argv)
    try:
        meta = generate(args.name, args.root)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(count_table(meta))
    print(f"wrote {args.root / 'meta.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
