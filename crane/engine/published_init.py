"""The global torch RNG draws the published ``train.py`` makes before it creates its prompt learner.

The published script seeds torch with ``--seed`` and then builds, on the CPU, its own
CLIP modules, the E-Attn modules and (Crane+) the hub DINOv2 before the prompt learner
draws its initial prompts; every module's default initialisation consumes the global
generator on the way, although the values are then overwritten by the pretrained
weights. The prompts it starts from therefore depend on the shapes of everything built
before them. :func:`replay_published_draws` performs the same initialisation calls on
throw-away tensors of the same shapes, in the same order, so the generator ends where
the published one does and :meth:`PromptLearner.reset_parameters` draws the published
initial prompts, without a second model being kept.

The draws, in order (``Wv``/``Wt`` vision/text width, ``E`` joint width):

1. the CLIP vision tower: patch ``Conv2d`` (no bias); ``randn`` of the class embedding,
   the positional embedding and (after the blocks) the projection; per block a
   ``MultiheadAttention`` (its output ``Linear``, then ``xavier_uniform_`` of the input
   projection) and the two MLP ``Linear`` layers;
2. the text tower: the same blocks at ``Wt``, then the token ``Embedding``;
3. CLIP's ``initialize_parameters``: ``normal_`` of the token embedding, the text
   positional embedding, each text block's four weight matrices and the text projection;
4. E-Attn: 19 self-correlation modules of two ``Linear`` layers each (``Wv -> 3 Wv`` with
   bias, ``Wv -> Wv``);
5. Crane+ (``dinov2``): the hub ``dinov2_vitb14_reg`` at its native 518 px (37 x 37 patches):
   the patch ``Conv2d`` and per block four ``Linear`` layers, then its ``init_weights``:
   ``trunc_normal_`` of the position embedding, ``normal_`` of the class and register tokens,
   ``trunc_normal_`` of every ``Linear`` weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

EATTN_MODULES = 19
"""``replace_with_EAttn(to_layer=20)`` builds one self-correlation module per block 1..19 from the end."""
DINOV2_HUB = dict(width=768, blocks=12, patch=14, native_size=518, registers=4)
"""``facebookresearch/dinov2`` ``dinov2_vitb14_reg`` (ViT-B/14, 4 register tokens)."""


@dataclass(frozen=True)
class ClipShapes:
    """The CLIP dimensions the published construction draws depend on."""

    vision_width: int
    vision_layers: int
    patch_size: int
    grid: int
    embed_dim: int
    text_width: int
    text_layers: int
    vocab_size: int
    context_length: int

    @classmethod
    def of(cls, clip: nn.Module) -> "ClipShapes":
        """Read the dimensions from an open_clip ``CLIP`` (OpenAI layout)."""
        visual = clip.visual
        return cls(vision_width=int(visual.conv1.weight.shape[0]), vision_layers=len(visual.transformer.resblocks),
                   patch_size=int(visual.conv1.weight.shape[-1]),
                   grid=round((visual.positional_embedding.shape[0] - 1) ** 0.5),
                   embed_dim=int(visual.proj.shape[1]), text_width=int(clip.token_embedding.weight.shape[1]),
                   text_layers=len(clip.transformer.resblocks), vocab_size=int(clip.token_embedding.weight.shape[0]),
                   context_length=int(clip.positional_embedding.shape[0]))


def _residual_block(width: int) -> None:
    """CLIP's residual attention block: attention (output projection, then input projection), MLP."""
    nn.MultiheadAttention(width, 1)
    nn.Linear(width, 4 * width)
    nn.Linear(4 * width, width)


def _clip(s: ClipShapes) -> None:
    nn.Conv2d(3, s.vision_width, s.patch_size, s.patch_size, bias=False)
    torch.randn(s.vision_width)
    torch.randn(s.grid ** 2 + 1, s.vision_width)
    for _ in range(s.vision_layers):
        _residual_block(s.vision_width)
    torch.randn(s.vision_width, s.embed_dim)
    for _ in range(s.text_layers):
        _residual_block(s.text_width)
    nn.Embedding(s.vocab_size, s.text_width)
    # initialize_parameters (the stds do not change what is consumed; kept for clarity)
    w = s.text_width
    torch.empty(s.vocab_size, w).normal_(std=0.02)
    torch.empty(s.context_length, w).normal_(std=0.01)
    for _ in range(s.text_layers):
        for shape in ((3 * w, w), (w, w), (4 * w, w), (w, 4 * w)):
            torch.empty(shape).normal_(std=w ** -0.5)
    torch.empty(w, s.embed_dim).normal_(std=w ** -0.5)


def _eattn(s: ClipShapes) -> None:
    for _ in range(EATTN_MODULES):
        nn.Linear(s.vision_width, 3 * s.vision_width, bias=True)
        nn.Linear(s.vision_width, s.vision_width)


def _dinov2_hub() -> None:
    w, blocks, patch, size, registers = (DINOV2_HUB[k] for k in ("width", "blocks", "patch", "native_size",
                                                                  "registers"))
    linear_shapes = ((w, 3 * w), (w, w), (w, 4 * w), (4 * w, w))  # attn.qkv, attn.proj, mlp.fc1, mlp.fc2
    nn.Conv2d(3, w, patch, patch)
    for _ in range(blocks):
        for fan_in, fan_out in linear_shapes:
            nn.Linear(fan_in, fan_out)
    nn.init.trunc_normal_(torch.empty(1, (size // patch) ** 2 + 1, w), std=0.02)
    torch.empty(1, 1, w).normal_(std=1e-6)
    torch.empty(1, registers, w).normal_(std=1e-6)
    for _ in range(blocks):
        for fan_in, fan_out in linear_shapes:
            nn.init.trunc_normal_(torch.empty(fan_out, fan_in), std=0.02)


@torch.no_grad()
def replay_published_draws(shapes: ClipShapes, dino_model: str) -> bool:
    """Advance the global torch generator as the published model construction does.

    Call right after ``torch.manual_seed(seed)``; then draw the prompts. Returns ``False``
    (after the CLIP and E-Attn draws) when ``dino_model`` is a VFM whose published
    construction is not replayed (``dino``, ``sam``): the initial prompts then differ from
    the published ones.
    """
    _clip(shapes)
    _eattn(shapes)
    if dino_model == "none":
        return True
    if dino_model in ("dinov2", "dinov2_vitb14_reg"):  # one model, two names
        _dinov2_hub()
        return True
    return False
