"""Reference memory files (``reference.pt``): what built a memory, and refusing one built otherwise.

A ``reference.pt`` is a torch file (loaded with ``weights_only``) holding::

    {"format": "crane-reference-1",
     "banks": [{"features": M x E float32, "indices": M int64, "radius": float}, ...],
     "spec": {"sets": [...], "use_vfm": bool, "weight": w, "scale": a, "shift": b, "coreset_ratio": r,
              "patches_per_image": L, "digests": [sha256 of each reference's preprocessed tensor, ...]},
     "info": {"model": model_identity(...), "images": [image_record(...), ...],
              "statistics": {"zero_shot": {"mean", "std", "pixels"}, "few_shot": {...}}, "provenance": {...}}}

``indices`` is the coreset choice (each kept row's place among the ``K L`` reference patches, image-major),
``radius`` its covering radius in cosine distance. ``info["model"]`` holds the settings that change the
patch features (layers, image size, E-Attn / D-Attn options, VFM) and fingerprints of the CLIP vision
tower's and the VFM's weights; :func:`load_reference` refuses, in one line, a memory whose record differs
from the model it is loaded for. The prompt learner (the checkpoint) does not change the patch features,
so a memory serves any checkpoint; its fingerprint (and the checkpoint's SHA-256, when the caller gives
it as ``provenance``) is recorded, not compared.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import settings
from .data.image import load_rgb, preprocess
from .errors import CraneError
from .files import file_identity, save_torch
from .models.crane import CraneModel
from .models.memory import (Bank, MapStatistics, MemorySpec, ReferenceMemory, coreset_size, distinct_sets,
                            memory_queries, tensor_digest)

FORMAT = "crane-reference-1"
FEATURE_SETTINGS = tuple(s.name for s in settings.SETTINGS if "config" in s.records and s.role in ("model", "vfm"))
"""``CraneConfig`` fields of the image side (:mod:`crane.settings`): what can change the patch features a memory
holds (a memory made with others is refused)."""
_SAMPLE = 4096


class ReferenceMemoryError(CraneError):
    """A reference memory cannot be built, read or used with this model (one-line message)."""


def image_record(image: Any, digest: str) -> dict[str, Any]:
    """What a reference image was: ``{"source", "file", "digest"}``; ``file`` is ``{"path", "identity"}``
    (:func:`crane.files.file_identity`, by content) for a file (``None`` for an in-memory image)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser().resolve()
        return {"source": str(path), "file": {"path": str(path), "identity": file_identity(path)}, "digest": digest}
    if isinstance(image, Image.Image):
        source = f"PIL image {image.width}x{image.height} {image.mode}"
    else:
        source = f"array {'x'.join(map(str, np.shape(image)))} {np.asarray(image).dtype}"
    return {"source": source, "file": None, "digest": digest}


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 over every entry of ``module``'s state dict: name, shape, dtype and up to 4096 evenly spaced
    values. Different weights (another CLIP, another VFM) differ everywhere, so this tells them apart
    without hashing hundreds of megabytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        if flat.numel() > _SAMPLE:
            flat = flat[torch.linspace(0, flat.numel() - 1, _SAMPLE, device=flat.device).long()]
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(flat.cpu().float().numpy().tobytes())
    return h.hexdigest()


def model_identity(model: CraneModel) -> dict[str, Any]:
    """What the patch features of ``model`` depend on: :data:`FEATURE_SETTINGS` and fingerprints of the vision
    tower and the VFM (compared by :func:`differences`), and of the prompt learner (recorded only)."""
    settings = {k: getattr(model.config, k) for k in FEATURE_SETTINGS}
    settings["features_list"] = [int(v) for v in settings["features_list"]]
    return {"settings": settings, "vision_weights": weights_fingerprint(model.vision.visual),
            "vfm_weights": None if model.vfm is None else weights_fingerprint(model.vfm),
            "prompt_learner": weights_fingerprint(model.prompt_learner)}


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """How the :func:`model_identity` ``current`` differs from a memory's ``recorded`` one, one phrase each."""
    if not isinstance(recorded, Mapping) or not isinstance(recorded.get("settings"), Mapping):
        return ["it records no model settings"]
    out = []
    for key, value in current["settings"].items():
        if key not in recorded["settings"]:
            out.append(f"it records no {key}")
        elif recorded["settings"][key] != value:
            out.append(f"{key} {recorded['settings'][key]}, this model {value}")
    for key, what in (("vision_weights", "CLIP weights"), ("vfm_weights", "VFM weights")):
        if recorded.get(key) != current[key]:
            out.append(f"other {what} (fingerprint {str(recorded.get(key))[:12]}, this model {str(current[key])[:12]})")
    return out


def check_reference(memory: ReferenceMemory, model: CraneModel, source: str = "the reference memory") -> None:
    """Raise :class:`ReferenceMemoryError` (one line) when ``memory`` was built for other patch features than
    ``model`` gives."""
    differ = differences(memory.info.get("model", {}), model_identity(model))
    if differ:
        raise ReferenceMemoryError(f"{source} was built with other settings: {'; '.join(differ)}; build it again "
                                   "from the reference images with this model")


def build_reference(detector: Any, images: Any, coreset_ratio: float = settings.DEFAULT_CORESET_RATIO, few_shot_weight: float = settings.DEFAULT_FEW_SHOT_WEIGHT,
                    use_vfm: bool = True, progress: bool = False, exif_orientation: bool = False,
                    bit_depth: int = 16) -> ReferenceMemory:
    """A :class:`ReferenceMemory` of ``images`` (one or a list of paths, PIL images, arrays) as ``detector``
    (a :class:`crane.Detector`) encodes them, on its device; see :meth:`crane.Detector.set_reference`.
    ``exif_orientation``: files are turned as their EXIF orientation tag says before preprocessing;
    ``bit_depth``: the bits 16-bit files hold (:func:`crane.data.image.load_rgb`).

    Raises :class:`ReferenceMemoryError` (one line) for no images. An image given twice (the same
    preprocessed pixels) is kept once: a copy adds nothing to the memory, and would be its own nearest
    neighbour in leave-one-out scoring.
    """
    from .detector import as_image_list

    images = as_image_list(images)
    if not images:
        raise ReferenceMemoryError("no reference images given: a reference memory needs at least one normal image")
    size, bs = detector.config.image_size, detector.batch_size
    digests: list[str] = []
    records: list[dict[str, Any]] = []
    per_bank: list[list[torch.Tensor]] = []
    sets: Optional[list[int]] = None
    zero = MapStatistics()
    bar = _progress(progress, len(images), "reference images", "image")
    for start in range(0, len(images), bs):
        tensors = []
        for image in images[start:start + bs]:
            tensor = preprocess(load_rgb(image, exif_orientation=exif_orientation, bit_depth=bit_depth), size)
            digest = tensor_digest(tensor)
            if digest in digests:
                continue
            digests.append(digest)
            records.append(image_record(image, digest))
            tensors.append(tensor)
        if tensors:
            features = detector.encode(torch.stack(tensors))
            if sets is None:
                sets = distinct_sets(features)
                use_vfm = use_vfm and features.vfm_features is not None
                per_bank = [[] for _ in range(len(sets) + int(use_vfm))]
            for bank, queries in zip(per_bank, memory_queries(features, sets, use_vfm)):
                bank.append(queries)
            zero.add(detector.zero_shot(features)[1])
        bar.update(len(images[start:start + bs]))
    bar.close()
    spec = MemorySpec(sets, use_vfm, few_shot_weight, digests=digests)
    features = [torch.cat(parts) for parts in per_bank]
    rows = features[0].shape[0] * features[0].shape[1]
    coreset_bar = _progress(progress and coreset_ratio < 1.0, (coreset_size(rows, coreset_ratio) - 1) * len(features),
                            "coreset", "row")
    memory = ReferenceMemory.build(features, spec, coreset_ratio, progress=coreset_bar.update,
                                   info={"model": model_identity(detector.model), "images": records})
    coreset_bar.close()
    memory.match_zero_shot(features, zero, size, bs)
    return memory


def _progress(enabled: bool, total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)


def save_reference(memory: ReferenceMemory, path: Union[str, os.PathLike],
                   provenance: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``memory`` to ``path`` atomically (:func:`crane.files.save_torch`); ``provenance`` (e.g. the checkpoint's path and
    SHA-256, JSON-able) is recorded under ``info["provenance"]``. Returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    info = dict(memory.info)
    if provenance is not None:
        info["provenance"] = dict(provenance)
    content = {"format": FORMAT,
               "banks": [{"features": b.features.detach().cpu(), "indices": b.indices.detach().cpu(),
                          "radius": b.radius} for b in memory.banks],
               "spec": asdict(memory.spec), "info": info}
    return save_torch(content, path)


def read_reference_file(path: Union[str, os.PathLike], mmap: bool = False) -> dict[str, Any]:
    """The content of a ``reference.pt`` (module docstring), without a model; ``mmap``: memory-mapped, so the banks
    are read only where used (their shapes and the ``spec`` cost nothing). :class:`ReferenceMemoryError` in one
    line when it is missing, unreadable or not a reference memory."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReferenceMemoryError(f"reference memory not found: {path}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # not a torch file, truncated, or holding Python objects
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise ReferenceMemoryError(f"{path} is not a readable reference memory ({reason})") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT or not isinstance(content.get("spec"), dict):
        raise ReferenceMemoryError(f"{path} is not a Crane reference memory (expected \"format\": \"{FORMAT}\"): "
                                   "build it again from the reference images (`python -m crane calibrate "
                                   "--reference_memory`, crane.reference.save_reference)")
    return content


def load_reference(path: Union[str, os.PathLike], model: CraneModel, **kwargs: Any) -> ReferenceMemory:
    """Read a ``reference.pt`` for ``model`` (on the CPU); :class:`ReferenceMemoryError` in one line when it is
    missing, not a reference memory (:func:`read_reference_file`), or built with other settings
    (:func:`check_reference`). ``kwargs`` go to :class:`ReferenceMemory` (``backend``, ``chunk``)."""
    content = read_reference_file(path)
    banks = [Bank(b["features"], b["indices"], float(b["radius"])) for b in content["banks"]]
    memory = ReferenceMemory(banks, MemorySpec(**content["spec"]), info=content["info"], **kwargs)
    check_reference(memory, model, str(Path(path).expanduser()))
    return memory
