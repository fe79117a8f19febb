"""Randomly initialised CLIP weights for demos and pipeline tests without downloads.

The vision tower is narrow (width 256, 24 blocks, patch 14, native 336) and the
text tower has the real ViT-L/14 shape (width 768, 12 blocks) so official
prompt-learner checkpoints load. The numbers such a model produces are
meaningless; they only exercise the pipeline.
"""
from __future__ import annotations

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg


def synthetic_clip_state_dict(vision_width: int = 256, vision_layers: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """An OpenAI-format CLIP state dict drawn from open_clip's own initialisation with ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(768, CLIPVisionCfg(layers=vision_layers, width=vision_width, patch_size=14, image_size=336, head_width=64),
                     CLIPTextCfg(context_length=77, vocab_size=49408, width=768, heads=12, layers=12), quick_gelu=True)
    return {k: v for k, v in model.state_dict().items() if k != "logit_bias"}
