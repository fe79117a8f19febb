"""Randomly initialised CLIP weights for demos and pipeline tests without downloads.

The vision tower has the architecture's depth, patch and native size with a narrow width
(256 by default), the text tower its real shape (the default tower's: width 768, 12 blocks,
so official prompt-learner checkpoints load). The numbers such a model produces are
meaningless; they only exercise the pipeline. ``vision_width=None`` gives the real width
(benchmarks of the real shapes).
"""
from __future__ import annotations

from typing import Optional

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from crane.settings import DEFAULT_CLIP_MODEL

from .towers import tower


def synthetic_clip_state_dict(vision_width: Optional[int] = 256, vision_layers: Optional[int] = None, seed: int = 0,
                              model: str = DEFAULT_CLIP_MODEL, text_width: Optional[int] = None,
                              text_layers: Optional[int] = None) -> dict[str, torch.Tensor]:
    """An OpenAI-format state dict of ``model``'s shapes (``None``: the real size; the vision width defaults to
    a narrow 256), drawn from open_clip's own initialisation with ``seed``."""
    t = tower(model)
    vision, text = t.config["vision_cfg"], t.config["text_cfg"]
    width = vision_width or t.width
    head_width = t.head_width if width % t.head_width == 0 else 64
    twidth = text_width or t.text_width
    vision_extra = {"mlp_ratio": vision["mlp_ratio"]} if "mlp_ratio" in vision else {}
    text_extra = {"mlp_ratio": text["mlp_ratio"]} if "mlp_ratio" in text else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIP(t.embed_dim, CLIPVisionCfg(layers=vision_layers or t.depth, width=width, patch_size=t.patch,
                                               image_size=t.image_size, head_width=head_width, **vision_extra),
                    CLIPTextCfg(context_length=t.context_length, vocab_size=int(text["vocab_size"]), width=twidth,
                                heads=t.text_heads if twidth == t.text_width else max(1, twidth // 64),
                                layers=text_layers or int(text["layers"]), **text_extra), quick_gelu=True)
    return {k: v for k, v in clip.state_dict().items() if k != "logit_bias"}
