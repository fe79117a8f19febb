"""Frozen image features for training: computed once per image, reused every epoch.

The CLIP (and VFM) side of Crane is frozen and deterministic, so what the loss
needs from an image — its normalised embedding and token sets — can be computed
once. :class:`FrozenImageEncoder` splits ``CraneModel.encode_image`` into a
per-image part (cached as an :data:`Entry`) and a per-batch part. The per-batch
part is trivial unless D-Attn runs with the published batch-wide mean
(``dattn_batch_mean``, quirk 3): then an image's D-Attn tokens depend on the
other images of its batch, so the cache keeps D-Attn's inputs (the block-24
stream ``t`` and the VFM features) and the attention is redone per batch.

:class:`FeatureCache` stores entries in memory, or on disk as one file per image
under a folder keyed by the weights and every option that changes the features.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from crane.files import save_torch
from crane.models.crane import CraneModel, ImageFeatures
from crane.models.precision import autocast, maybe_compiled

Entry = dict[str, Any]
"""One image's cached features (CPU tensors): ``embedding`` ``E``; ``sets``, the distinct token
sets, each ``L x E``; ``layout``, for every token set of the model the index into ``sets``, or
:data:`DATTN` for a D-Attn set rebuilt per batch (then ``dattn_t`` maps each D-Attn layer to its
input ``N x D`` and ``dattn_feats`` holds the VFM features ``C x H x W``); ``mask`` ``S x S``
bool; ``label`` int."""

DATTN = -1


class FrozenImageEncoder:
    """``model.encode_image`` in two steps: :meth:`encode` (per image, cacheable) and :meth:`assemble` (per batch).

    ``precision``: the image side runs under that autocast (``fp32``: float32, no TF32); the embeddings and
    token sets stay float32 (:mod:`crane.models.precision`). ``compile``: the per-image part runs
    through ``torch.compile`` (uncompiled, with a warning, where compiling fails).
    """

    def __init__(self, model: CraneModel, precision: str = "fp32", compile: bool = False) -> None:
        self.model = model
        self.precision = precision
        self.batch_mean = model.vfm is not None and model.config.dattn_batch_mean
        self._encode_image = maybe_compiled(model.encode_image, compile and not self.batch_mean, "the image encoder")
        self._image_parts = maybe_compiled(model.image_parts, compile and self.batch_mean, "the image encoder")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[Entry]:
        """``B x 3 x S x S`` CLIP-normalised images -> one entry per image (tensors on CPU)."""
        if not self.batch_mean:
            with autocast(images.device.type, self.precision):
                feats = self._encode_image(images)
            return [_entry(feats.image_embedding[i], [s[i] for s in feats.patch_tokens]) for i in range(len(images))]
        with autocast(images.device.type, self.precision):
            parts = self._image_parts(images)
        layout = self.model.set_layout
        entries = []
        for i in range(len(images)):
            entry = _entry(parts.image_embedding[i],
                           [None if kind == "dattn" else parts.eattn[layer][i] for kind, layer in layout])
            entry["dattn_t"] = {layer: t[i].detach().cpu().clone() for layer, t in parts.dattn_inputs.items()}
            entry["dattn_feats"] = parts.vfm_features[i].detach().cpu().clone()
            entries.append(entry)
        return entries

    def assemble(self, entries: Sequence[Entry], device: Union[str, torch.device]) -> ImageFeatures:
        """Stack entries into the :class:`ImageFeatures` of one batch on ``device``."""
        embedding = torch.stack([e["embedding"] for e in entries]).to(device)
        layout = entries[0]["layout"]
        distinct = [torch.stack([e["sets"][j] for e in entries]).to(device) for j in range(len(entries[0]["sets"]))]
        if DATTN not in layout:
            return ImageFeatures(embedding, [distinct[j] for j in layout])
        dattn = self._dattn_sets(entries, device)
        return ImageFeatures(embedding, [dattn[layer] if j == DATTN else distinct[j]
                                         for j, (_, layer) in zip(layout, self.model.set_layout)])

    @torch.no_grad()
    def _dattn_sets(self, entries: Sequence[Entry], device: Union[str, torch.device]) -> dict[int, torch.Tensor]:
        """D-Attn token sets by layer (``B x L x E``) with the mean of ``Sim`` over this batch (quirk 3)."""
        inputs = {layer: torch.stack([e["dattn_t"][layer] for e in entries]).to(device) for layer in entries[0]["dattn_t"]}
        feats = torch.stack([e["dattn_feats"] for e in entries]).to(device)
        with autocast(torch.device(device).type, self.precision):
            return self.model.dattn_sets(inputs, feats)


def _entry(embedding: torch.Tensor, sets: Sequence[Optional[torch.Tensor]]) -> Entry:
    """Keep each distinct token set once (quirk 1 makes the E-Attn sets of Crane identical); ``None``: D-Attn."""
    distinct: list[torch.Tensor] = []
    layout: list[int] = []
    for s in sets:
        if s is None:
            layout.append(DATTN)
            continue
        match = next((j for j, d in enumerate(distinct) if d.shape == s.shape and torch.equal(d, s.cpu())), None)
        if match is None:
            distinct.append(s.detach().cpu().clone())
            match = len(distinct) - 1
        layout.append(match)
    return {"embedding": embedding.detach().cpu().clone(), "sets": distinct, "layout": layout}


def options_key(settings: Mapping[str, Any]) -> str:
    """A short stable hash of the settings that determine the features."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FeatureCache:
    """Entries by key, in memory (``folder=None``) or as ``folder/KEY.pt`` files written atomically."""

    def __init__(self, folder: Optional[Union[str, os.PathLike]] = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[str, Entry] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()}.pt"

    def __contains__(self, key: str) -> bool:
        return key in self._memory if self.folder is None else self._file(key).is_file()

    def get(self, key: str) -> Entry:
        if self.folder is None:
            return self._memory[key]
        return torch.load(self._file(key), map_location="cpu", weights_only=True)

    def put(self, key: str, entry: Entry) -> None:
        if self.folder is None:
            self._memory[key] = entry
            return
        save_torch(entry, self._file(key))

    def update(self, entries: Mapping[str, Entry]) -> None:
        for key, entry in entries.items():
            self.put(key, entry)
