"""Crane's learnable prompts and the CLIP text encoder with deep prompts.

An official checkpoint is ``{"prompt_learner": state_dict}`` with 16 entries:
``ctx_pos``, ``ctx_neg`` (``1 x 1 x n_ctx x W``), ``compound_prompts_text.{0..depth-2}``
(``t_n_ctx x W``) and the buffers ``token_prefix_*``, ``token_suffix_*``,
``tokenized_prompts_*`` for the normal (``pos``) and anomalous (``neg``) prompt.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from crane.files import save_torch

from .errors import CheckpointMismatchError

IMAGE_TOKEN_TYPES = ("pad_suffix", "pad_prefix", "replace_prefix", "replace_suffix")
STATE_TEMPLATES = ("{}", "damaged {}")
CLASS_NAME = "object"


class PromptLearner(nn.Module):
    """Learnable context for the "normal" and "anomalous" prompts plus deep text prompts.

    Args:
        token_embedding: the CLIP token embedding (``vocab x W``) used to build the
            fixed prefix/suffix buffers.
        tokenizer: an open_clip tokenizer (``texts -> K x 77`` ids).
        n_ctx: learnable context vectors per prompt (12).
        t_n_ctx: deep prompt tokens per text block (4).
        depth: deep prompts go into text blocks ``2 .. depth`` (9).
    """

    def __init__(self, token_embedding: nn.Embedding, tokenizer, n_ctx: int = 12, t_n_ctx: int = 4,
                 depth: int = 9) -> None:
        super().__init__()
        width = token_embedding.weight.shape[1]
        self.n_ctx, self.t_n_ctx, self.depth = n_ctx, t_n_ctx, depth
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(t_n_ctx, width)) for _ in range(depth - 1)])
        self.ctx_pos = nn.Parameter(torch.empty(1, 1, n_ctx, width))
        self.ctx_neg = nn.Parameter(torch.empty(1, 1, n_ctx, width))
        self.reset_parameters()
        prefix = " ".join(["X"] * n_ctx)
        for state, template in zip(("pos", "neg"), STATE_TEMPLATES):
            ids = tokenizer([f"{prefix} {template.format(CLASS_NAME)}."])
            with torch.no_grad():
                emb = token_embedding(ids).float()
            self.register_buffer(f"tokenized_prompts_{state}", ids.to(torch.int32).view(1, 1, -1))
            self.register_buffer(f"token_prefix_{state}", emb[:, None, :1].clone())
            self.register_buffer(f"token_suffix_{state}", emb[:, None, 1 + n_ctx:].clone())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw every prompt from ``N(0, 0.02^2)`` with the global torch generator, in the published
        order: the deep prompts (block by block), then ``ctx_pos``, then ``ctx_neg``. After the same
        earlier draws and seed, this gives the published initial prompts."""
        for prompt in self.compound_prompts_text:
            prompt.normal_(std=0.02)
        self.ctx_pos.normal_(std=0.02)
        self.ctx_neg.normal_(std=0.02)

    def load_official(self, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load an official prompt-learner state dict strictly, with a readable error on mismatch."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise CheckpointMismatchError(
                f"{source} does not fit this prompt learner (n_ctx={self.n_ctx}, t_n_ctx={self.t_n_ctx}, "
                f"depth={self.depth}, width={self.ctx_pos.shape[-1]}):"
                + (f"\n  missing keys: {missing}" if missing else "")
                + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
                + (f"\n  shape mismatches: {shapes}" if shapes else "")
                + "\nCheck --n_ctx/--t_n_ctx/--depth and that the CLIP text width matches the checkpoint.")
        self.load_state_dict(state_dict, strict=True)

    def forward(self, image_embedding: Optional[torch.Tensor] = None, image_token_type: str = "pad_suffix"
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings and token ids, all normal prompts first, then all anomalous.

        Without ``image_embedding``: ``2 x 77 x W`` and ``2 x 77``. With ``image_embedding``
        (``B x W``, normalised), each image gets its own pair: ``2B x 77 x W`` and ``2B x 77``.
        """
        prompts, ids = [], []
        for state in ("pos", "neg"):
            ctx = getattr(self, f"ctx_{state}")[0]  # 1 x n_ctx x W
            prefix = getattr(self, f"token_prefix_{state}")[0]
            suffix = getattr(self, f"token_suffix_{state}")[0]
            tok = getattr(self, f"tokenized_prompts_{state}")[0].long()  # 1 x 77
            if image_embedding is None:
                prompts.append(torch.cat([prefix, ctx, suffix], dim=1))
                ids.append(tok)
                continue
            b = image_embedding.shape[0]
            img = image_embedding[:, None, :].to(ctx.dtype)
            ctx, prefix, suffix = ctx.expand(b, -1, -1), prefix.expand(b, -1, -1), suffix.expand(b, -1, -1)
            p, t = _condition_on_image(prefix, ctx, suffix, img, tok, image_token_type)
            prompts.append(p)
            ids.append(t.expand(b, -1))
        return torch.cat(prompts, dim=0), torch.cat(ids, dim=0)


def prompt_shape_problem(state_dict: Mapping[str, torch.Tensor], n_ctx: int, t_n_ctx: int, depth: int,
                         width: Optional[int] = None, trained_on: Optional[str] = None) -> Optional[str]:
    """Why a prompt-learner state dict cannot load into a learner of ``n_ctx``, ``t_n_ctx``, ``depth`` and
    (when given) the text ``width`` of the run's CLIP tower, as one line (``None`` when its shapes fit); read
    from the tensors, before any model is built. ``trained_on``: the ``clip_model`` the checkpoint records.
    A width that differs is another backbone, which no flag (``--force`` included) can bridge."""
    ctx = state_dict.get("ctx_pos")
    found_w = ctx.shape[-1] if isinstance(ctx, torch.Tensor) and ctx.ndim >= 1 else None
    if width is not None and found_w is not None and found_w != width:
        from crane.settings import DEFAULT_CLIP_MODEL

        made = trained_on or f"{DEFAULT_CLIP_MODEL}, as it records no --clip_model"
        return (f"the checkpoint's prompts are {found_w} wide (made for --clip_model {made}) but this CLIP text "
                f"tower is {width} wide: use the checkpoint with its own --clip_model (--force cannot bridge "
                "prompt widths that differ)")
    deep = sorted(k for k in state_dict if k.startswith("compound_prompts_text."))
    found_n = ctx.shape[-2] if isinstance(ctx, torch.Tensor) and ctx.ndim >= 2 else None
    found_t = state_dict[deep[0]].shape[0] if deep else None
    wrong = [f"--{flag} {value} (the checkpoint's {tensor} has {found})" for flag, value, found, tensor in
             (("n_ctx", n_ctx, found_n, "ctx_pos"), ("depth", depth, len(deep) + 1, "compound_prompts_text"),
              ("t_n_ctx", t_n_ctx, found_t, "compound_prompts_text"))
             if found is not None and value != found]
    return f"the checkpoint does not fit the prompt learner: {', '.join(wrong)}" if wrong else None


def _condition_on_image(prefix: torch.Tensor, ctx: torch.Tensor, suffix: torch.Tensor, img: torch.Tensor,
                        tok: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert the image embedding ``img`` (``B x 1 x W``) as a context token; keep length 77."""
    n_ctx = ctx.shape[1]
    if kind == "pad_suffix":
        prompt = torch.cat([prefix, ctx, img, suffix[:, :-1]], dim=1)
        tok = torch.cat([tok[:, :1 + n_ctx], tok[:, n_ctx:n_ctx + 1], tok[:, 1 + n_ctx:-1]], dim=1)
    elif kind == "pad_prefix":
        prompt = torch.cat([prefix, img, ctx, suffix[:, :-1]], dim=1)
        tok = torch.cat([tok[:, :1], tok[:, 1:2], tok[:, 1:-1]], dim=1)
    elif kind == "replace_prefix":
        prompt = torch.cat([prefix, img, ctx[:, 1:], suffix], dim=1)
    elif kind == "replace_suffix":
        prompt = torch.cat([prefix, ctx[:, :-1], img, suffix], dim=1)
    else:
        raise ValueError(f"unknown train_with_img_cls_type {kind!r}; choose one of {', '.join(IMAGE_TOKEN_TYPES)}")
    return prompt, tok


def encode_text(clip: nn.Module, prompts: torch.Tensor, token_ids: torch.Tensor,
                deep_prompts: Union[nn.ParameterList, list[torch.Tensor]], published_rounding: bool = False
                ) -> torch.Tensor:
    """CLIP text encoder on prompt embeddings with deep prompts: ``K x 77 x W`` -> ``K x E``.

    Before text block ``i+2`` (1-indexed) token positions ``1 .. t_n_ctx`` are replaced
    by ``deep_prompts[i]``, rounded through float16 as the published code does (quirk 4).

    ``published_rounding=False`` (training): batch-first, and only the tokens up to the last
    EOT position are run; the attention is causal, so the rest cannot change the output
    (the same numbers to float rounding, a fraction of the work).
    ``published_rounding=True`` (evaluation, where the features are computed once): the
    published computation order, which gives its text features bit for bit (quirk: its
    float rounding depends on running all 77 positions sequence-first through
    ``nn.MultiheadAttention``'s reference path). A last-bit difference in the two text
    features shifts every map by a few ulps the same way, and the published on-grid AUPRO
    (200 thresholds compared with ``>``) moves by up to ~2e-4 on flat maps.
    """
    eot = token_ids.argmax(dim=-1)
    n = prompts.shape[1] if published_rounding else int(eot.max()) + 1
    x = prompts[:, :n] + clip.positional_embedding[:n].to(prompts.dtype)
    attn_mask = clip.attn_mask[:n, :n].to(x.dtype)
    if published_rounding:
        x = x.transpose(0, 1)  # L x K x W
    for i, block in enumerate(clip.transformer.resblocks):
        if 1 <= i <= len(deep_prompts):
            # Expand before the cast, as published: the gradient is rounded per prompt, then summed.
            deep = deep_prompts[i - 1].expand(prompts.shape[0], -1, -1).to(torch.float16).to(x.dtype)
            if published_rounding:
                x = torch.cat([x[:1], deep.transpose(0, 1), x[1 + deep.shape[1]:]], dim=0)
            else:
                x = torch.cat([x[:, :1], deep, x[:, 1 + deep.shape[1]:]], dim=1)
        x = _sequence_first_block(block, x, attn_mask) if published_rounding else block(x, attn_mask=attn_mask)
    if published_rounding:
        x = x.transpose(0, 1)
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0], device=x.device), eot] @ clip.text_projection


def _sequence_first_block(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """One open_clip ``ResidualAttentionBlock`` on ``L x K x W`` input, its attention through
    ``F.multi_head_attention_forward`` (what a sequence-first ``nn.MultiheadAttention`` runs)."""
    attn = block.attn
    h = block.ln_1(x)
    h = F.multi_head_attention_forward(
        h, h, h, attn.embed_dim, attn.num_heads, attn.in_proj_weight, attn.in_proj_bias, None, None, False, 0.0,
        attn.out_proj.weight, attn.out_proj.bias, training=False, need_weights=False, attn_mask=attn_mask)[0]
    x = x + block.ls_1(h)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def load_prompt_checkpoint(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read ``{"prompt_learner": state_dict}`` (the official format) from ``path``."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        from .errors import WeightsNotFoundError

        raise WeightsNotFoundError(
            f"prompt-learner checkpoint not found: {path}\n"
            "Official checkpoints: `bash scripts/download_weights.sh` puts them in "
            "checkpoints/trained_on_{mvtec,visa}_{crane,cranep}/epoch_N.pth; or pass --checkpoint FILE.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "prompt_learner" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointMismatchError(f"{path} is not a Crane checkpoint: expected a dict with key 'prompt_learner', found {keys}")
    return ckpt["prompt_learner"]


def save_prompt_checkpoint(learner: PromptLearner, path: Union[str, os.PathLike],
                           extra: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``{"prompt_learner": state_dict, **extra}`` atomically (:func:`crane.files.save_torch`).

    ``extra`` holds further top-level entries (``train.py`` adds ``"crane"``, the settings it
    trained with; see :mod:`crane.checkpoints`); readers of the official format use
    ``["prompt_learner"]`` only.
    """
    state = {"prompt_learner": {k: v.detach().cpu() for k, v in learner.state_dict().items()}}
    for key, value in (extra or {}).items():
        if key in state:
            raise ValueError(f"extra checkpoint entry {key!r} would replace the prompt learner")
        state[key] = value
    save_torch(state, path)
