"""Which weights files a run uses, checked before any model is built.

* :func:`weights_file`: the file behind ``--clip_weights`` / ``--dino_weights`` (``openai`` and the
  default VFM weights resolved to their cached file), for file identities;
* :func:`clip_depth`: the vision tower's blocks, read from the file's keys without loading tensors (a
  pretrained tag or ``synthetic``: the ``--clip_model`` architecture's);
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
from crane.settings import DEFAULT_CLIP_MODEL

from .errors import WeightsNotFoundError

_RESBLOCK = re.compile(r"^(?:module\.)?(?:state_dict\.|model\.)?visual\.transformer\.resblocks\.(\d+)\.")


def _is_file(weights: Optional[str]) -> bool:
    return weights not in (None, "openai", "synthetic") and Path(str(weights)).expanduser().is_file()


def weights_file(kind: str, weights: Optional[str], clip_model: str = DEFAULT_CLIP_MODEL) -> Optional[str]:
    """The weights file of ``kind`` (``"clip"`` or a ``dino_model``): ``weights`` itself, the cached file
    for a pretrained tag of ``clip_model`` such as ``openai`` (CLIP) or ``None`` (a VFM's default),
    ``synthetic`` as it is, ``None`` for no VFM. Raises :class:`WeightsNotFoundError` when a cached file
    is absent."""
    if kind == "none" or weights == "synthetic":
        return None if kind == "none" else weights
    if kind == "clip":
        if weights is None or (not _is_file(weights) and _is_tag(clip_model, weights)):
            from .clip_loader import resolve_pretrained

            return resolve_pretrained(clip_model, weights or "openai")
        return weights
    if weights is None:
        from .vfm import resolve_vfm_weights

        return resolve_vfm_weights(kind)
    return weights


def _is_tag(clip_model: str, weights: str) -> bool:
    """Whether ``weights`` is an open_clip pretrained tag of ``clip_model`` (``openai`` always counts)."""
    if weights == "openai":
        return True
    from .towers import clip_model_problem

    if clip_model_problem(clip_model):
        return False
    from .clip_loader import pretrained_cfg

    return bool(pretrained_cfg(clip_model, weights))


def clip_depth(weights: str, clip_model: str = DEFAULT_CLIP_MODEL) -> Optional[int]:
    """Blocks of the CLIP vision tower ``weights`` names, read without loading tensors (a pretrained tag or
    ``synthetic``: ``clip_model``'s); ``None`` when that cannot be told cheaply (a TorchScript archive, a
    legacy pickle, an unknown tower): the load checks it then."""
    from .towers import tower_depth

    if weights == "synthetic" or not _is_file(weights):
        return tower_depth(clip_model)
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


def clip_state_depth(state_dict: Mapping) -> Optional[int]:
    """Blocks of the vision tower of an in-memory CLIP state dict (``None`` when it has none)."""
    return _resblocks(state_dict.keys()) or None


def _resblocks(keys) -> int:
    return len({m.group(1) for m in map(_RESBLOCK.match, keys) if m})


def tower_depth_of(clip_model: str, clip_weights: str) -> Optional[int]:
    """The depth the tower-scaled defaults follow: the weights file's tower, else ``clip_model``'s."""
    from .towers import tower_depth

    return clip_depth(str(clip_weights), clip_model) or tower_depth(clip_model)


def text_width_of(clip_model: str, clip_weights: str) -> Optional[int]:
    """The prompt width the run's text tower takes: ``clip_model``'s text width, ``None`` when the weights are a
    file (its tensors tell; the model load checks them) or the tower is unknown."""
    from .towers import clip_model_problem, tower

    if _is_file(str(clip_weights)) or clip_model_problem(clip_model):
        return None
    return tower(clip_model).text_width


def weights_problems(clip_weights: str, dino_model: str, dino_weights: Optional[str],
                     clip_model: str = DEFAULT_CLIP_MODEL, caches: bool = True) -> list[str]:
    """One line per weights file the run needs that is not there: an unusable ``--clip_model``, a
    ``--clip_weights`` / ``--dino_weights`` file that does not exist, or (``caches``) a cached download (a
    pretrained tag such as ``openai``, the default VFM weights) that is absent (with where to put it and the
    flag)."""
    from .towers import clip_model_problem

    out = []
    clip = str(clip_weights)
    problem = clip_model_problem(clip_model)
    if problem:
        out.append(problem)
    elif clip != "synthetic" and not _is_file(clip) and not _is_tag(clip_model, clip):
        out.append(f"CLIP weights file not found: {clip}; pass --clip_weights openai (the cached download) or "
                   f"another pretrained tag of {clip_model}, a weights file ({'a ViT-L-14-336px.pt file' if clip_model == DEFAULT_CLIP_MODEL else 'of that tower'}), or synthetic")
    if dino_model != "none" and dino_weights not in (None, "synthetic") and \
            not Path(dino_weights).expanduser().is_file():
        out.append(f"--dino_weights file not found: {dino_weights}")
    for kind, weights in (("clip", clip), (dino_model, dino_weights)) if caches else ():
        if (kind == "clip" and not problem and weights != "synthetic" and not _is_file(weights)
                and _is_tag(clip_model, weights)) or (kind not in ("clip", "none") and weights is None):
            try:
                weights_file(kind, weights, clip_model)
            except WeightsNotFoundError as e:
                out.append(one_line(e))
    return out
