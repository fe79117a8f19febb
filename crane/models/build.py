"""Building a :class:`~crane.models.crane.CraneModel` from weights, a config and a prompt-learner checkpoint."""
from __future__ import annotations

import logging
import os
from typing import Mapping, Optional, Union

from .clip_loader import ClipWeights, load_clip
from .crane import CraneConfig, CraneModel
from .prompts import load_prompt_checkpoint
from .vfm import VfmWeights, load_vfm

log = logging.getLogger(__name__)


def tokenizer(clip_model: str):
    """open_clip's tokenizer of ``clip_model`` (CLIP's BPE; the context length of its text tower)."""
    import open_clip

    return open_clip.get_tokenizer(clip_model)


def build_model(clip_weights: Union[ClipWeights, str] = "openai", checkpoint: Union[None, str, os.PathLike, Mapping] = None,
                dino_weights: VfmWeights = None, config: Optional[CraneConfig] = None) -> CraneModel:
    """Build a :class:`CraneModel` on CPU from weights and an optional prompt-learner checkpoint (a file or
    a state dict already read; without one the prompts keep their initial values).

    ``clip_weights``: ``"openai"`` or another open_clip pretrained tag of ``config.clip_model``, a file,
    an OpenAI-format state dict, or ``"synthetic"`` (random weights of that architecture, narrow vision
    width; meaningless numbers, for pipeline demos).
    """
    config = config or CraneConfig()
    random_parts = [f"--{flag} synthetic" for flag, w in (("clip_weights", clip_weights), ("dino_weights", dino_weights))
                    if isinstance(w, str) and w == "synthetic" and (flag == "clip_weights" or config.dino_model != "none")]
    if random_parts:
        log.warning("RANDOM WEIGHTS (%s): the numbers are meaningless; this run only exercises the pipeline",
                    ", ".join(random_parts))
    if isinstance(clip_weights, str) and clip_weights == "synthetic":
        from .synthetic import synthetic_clip_state_dict

        clip_weights = synthetic_clip_state_dict(model=config.clip_model)
    clip = load_clip(clip_weights, model=config.clip_model)
    vfm = None if config.dino_model == "none" else load_vfm(config.dino_model, dino_weights, config.image_size)
    model = CraneModel(clip, tokenizer(config.clip_model), config, vfm)
    if checkpoint is not None:
        sd = checkpoint if isinstance(checkpoint, Mapping) else load_prompt_checkpoint(checkpoint)
        model.prompt_learner.load_official(sd, source=str(checkpoint) if not isinstance(checkpoint, Mapping) else "checkpoint")
    return model.eval()
