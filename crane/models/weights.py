"""Which weights files a run uses, checked before any model is built.

* :func:`weights_file`: the file behind ``--clip_weights`` / ``--dino_weights`` (``openai`` and the
  default VFM weights resolved to their cached file), for file identities;
* :func:`clip_depth`: the vision tower's blocks, read from the file's keys without loading tensors;
* :func:`weights_problems`: one line per missing weights file or cache entry, for every entry point.
"""
from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path
from typing import Mapping, Optional

from crane.errors import one_line
from crane.settings import CLIP_DEPTH

from .errors import WeightsNotFoundError

_RESBLOCK = re.compile(r"^(?:module\.)?(?:state_dict\.|model\.)?visual\.transformer\.resblocks\.(\d+)\.")


def weights_file(kind: str, weights: Optional[str]) -> Optional[str]:
    """The weights file of ``kind`` (``"clip"`` or a ``dino_model``): ``weights`` itself, the cached file
    for ``openai`` (CLIP) or ``None`` (a VFM's default), ``synthetic`` as it is, ``None`` for no VFM.
    Raises :class:`WeightsNotFoundError` when a cached file is absent."""
    if kind == "none" or weights == "synthetic":
        return None if kind == "none" else weights
    if kind == "clip":
        if weights in (None, "openai"):
            from .clip_loader import resolve_openai_weights

            return resolve_openai_weights()
        return weights
    if weights is None:
        from .vfm import resolve_vfm_weights

        return resolve_vfm_weights(kind)
    return weights


def clip_depth(weights: str) -> Optional[int]:
    """Blocks of the CLIP vision tower ``weights`` names, read without loading tensors; ``None`` when
    that cannot be told cheaply (a TorchScript archive, a legacy pickle): the load checks it then."""
    if weights in ("openai", "synthetic"):
        return CLIP_DEPTH
    path = Path(weights).expanduser()
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                return _resblocks(json.loads(f.read(length)))
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            if any("/code/" in name for name in archive.namelist()):
                return None  # TorchScript (OpenAI's ViT-L-14-336px.pt)
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable here: building the model reports it
        return None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
        return _resblocks(state.keys()) or None
    return None


def _resblocks(keys) -> int:
    return len({m.group(1) for m in map(_RESBLOCK.match, keys) if m})


def weights_problems(clip_weights: str, dino_model: str, dino_weights: Optional[str], caches: bool = True
                     ) -> list[str]:
    """One line per weights file the run needs that is not there: a ``--clip_weights`` / ``--dino_weights``
    file that does not exist, or (``caches``) a cached download (``openai``, the default VFM weights) that
    is absent (with where to put it and the flag)."""
    out = []
    clip = str(clip_weights)
    if clip not in ("openai", "synthetic") and not Path(clip).expanduser().is_file():
        out.append(f"CLIP weights file not found: {clip}; pass --clip_weights openai (the cached download), "
                   "a ViT-L-14-336px.pt file, or synthetic")
    if dino_model != "none" and dino_weights not in (None, "synthetic") and \
            not Path(dino_weights).expanduser().is_file():
        out.append(f"--dino_weights file not found: {dino_weights}")
    for kind, weights in (("clip", clip), (dino_model, dino_weights)) if caches else ():
        if (kind == "clip" and weights == "openai") or (kind not in ("clip", "none") and weights is None):
            try:
                weights_file(kind, weights)
            except WeightsNotFoundError as e:
                out.append(one_line(e))
    return out
