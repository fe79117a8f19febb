"""The CLIP vision tower with Crane's E-Attn dual path and Crane+'s D-Attn.

Notation: ``B`` batch, ``N = g*g + 1`` tokens (class token first), ``D`` width,
``h`` heads, ``hd = D / h``, ``E`` joint embedding width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..settings import ATTN_TYPES

_TERMS = {"qq+kk+vv": "vkq", "qq+kk": "kq", "qq": "q", "kk": "k", "vv": "v"}


@dataclass
class VisionStreams:
    """What :meth:`CraneVisionEncoder.forward_features` keeps (all ``B x N x D``, class token first).

    ``xo``: the original stream after the last block. ``own``: each requested layer's stream
    right after its block (the refined stream from the first dual-path block on). ``refined``:
    the refined stream after the last block (``None`` without a dual path). ``dattn_inputs``:
    the D-Attn input ``t`` of each requested D-Attn layer. ``alias_from``: with quirk 1, the
    first layer whose tokens are the final refined stream (``None``: no aliasing).
    """

    xo: torch.Tensor
    own: dict[int, torch.Tensor]
    refined: Optional[torch.Tensor]
    dattn_inputs: dict[int, torch.Tensor]
    alias_from: Optional[int]

    def tokens(self, layer: int) -> torch.Tensor:
        """The E-Attn tokens of ``layer`` as Crane uses them.

        Quirk 1 (layer aliasing): the published code collects the refined stream as a view
        that later blocks update in place, so every dual-path layer yields the refined
        stream after the last block.
        """
        if self.alias_from is not None and layer >= self.alias_from:
            return self.refined
        return self.own[layer]


def resample_tokens(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``B x g*g x D`` patch tokens resized bilinearly (``align_corners=False``) to ``B x H*W x D``;
    unchanged when the grid already is ``size``."""
    b, n, d = tokens.shape
    g = round(n ** 0.5)
    if (g, g) == tuple(size):
        return tokens
    grid = tokens.transpose(1, 2).reshape(b, d, g, g)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)


def interpolate_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a ``(1 + n*n) x D`` positional embedding to ``(1 + grid*grid) x D``.

    As in the published code: bilinear, ``align_corners=False``, no antialias; the
    class position is kept unchanged.
    """
    n = round((pos.shape[0] - 1) ** 0.5)
    if n == grid:
        return pos
    patch = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(grid * grid, -1)], dim=0)


def _split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``B x N x 3D`` -> three ``B x h x N x hd`` tensors."""
    b, n, three_d = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, heads, three_d // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``B x h x N x hd`` -> ``B x N x D``."""
    b, h, n, hd = x.shape
    return x.transpose(1, 2).reshape(b, n, h * hd)


def self_correlation_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_type: str) -> torch.Tensor:
    """``A_s v`` for an E-Attn ``attn_type``; inputs and output ``B x h x N x hd``.

    Each ``softmax(t t^T s) v`` term is an ordinary attention with query = key = t,
    so it runs in the fused kernel and no ``N x N`` matrix is materialised.
    """
    scale = q.shape[-1] ** -0.5
    if attn_type == "(q+k+v)^2":
        c = torch.cat([q, k, v], dim=-1)
        return F.scaled_dot_product_attention(c, c, v, scale=scale / math.sqrt(3.0))
    terms = {"q": q, "k": k, "v": v}
    out: Optional[torch.Tensor] = None
    for name in _TERMS[attn_type]:
        t = terms[name]
        y = F.scaled_dot_product_attention(t, t, v, scale=scale)
        out = y if out is None else out + y
    return out


class CraneVisionEncoder(nn.Module):
    """Runs an open_clip ``VisionTransformer`` with the E-Attn dual path.

    Blocks ``1 .. eattn_start-1`` are standard; blocks ``eattn_start .. depth``
    compute attention on the original stream ``xo`` only and update both the
    original stream (attention + MLP) and the refined stream ``xs`` (self-correlation
    attention, no MLP).

    Args:
        visual: the open_clip vision tower (weights are shared, not copied).
        attn_type: one of :data:`ATTN_TYPES`.
        eattn_layers: how many final blocks run the dual path (19 in Crane: blocks 6..24).
        layer_aliasing: reproduce quirk 1 of the published code (every requested
            E-Attn layer returns the refined stream after the last block). ``False``
            returns each layer's own refined tokens.
    """

    def __init__(self, visual: nn.Module, attn_type: str = "qq+kk+vv", eattn_layers: int = 19,
                 layer_aliasing: bool = True) -> None:
        super().__init__()
        if attn_type not in ATTN_TYPES:
            raise ValueError(f"unknown attn_type {attn_type!r}; choose one of {', '.join(ATTN_TYPES)}")
        self.visual = visual
        self.attn_type = attn_type
        self.depth = len(visual.transformer.resblocks)
        self.eattn_start = max(1, self.depth - eattn_layers + 1)
        self.layer_aliasing = layer_aliasing
        self.patch_size = visual.conv1.kernel_size[0]
        self._pos_cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def _pos_embed(self, grid: int, ref: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # torch.export / torch.compile trace fake tensors: never cache those
            return interpolate_pos_embed(self.visual.positional_embedding, grid).to(ref)
        key = (grid, ref.device, ref.dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = interpolate_pos_embed(self.visual.positional_embedding, grid).to(ref)
        return self._pos_cache[key]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` -> ``B x N x D`` tokens after ``ln_pre``."""
        v = self.visual
        x = v.conv1(x)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(grid, x)
        return v.ln_pre(x)

    def _qkv(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        return F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)

    def _dual_attention(self, block: nn.Module, xo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y_o, y_s)``, each ``B x N x D``: original and self-correlation attention outputs."""
        q, k, v = _split_heads(self._qkv(block, xo), block.attn.num_heads)
        y_o = F.scaled_dot_product_attention(q, k, v)
        y_s = self_correlation_attention(q, k, v, self.attn_type)
        out = block.attn.out_proj
        return F.linear(_merge_heads(y_o), out.weight, out.bias), F.linear(_merge_heads(y_s), out.weight, out.bias)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ln_post`` then ``proj``: ``B x L x D`` -> ``B x L x E``."""
        return self.visual.ln_post(tokens) @ self.visual.proj

    def forward_features(self, x: torch.Tensor, layers: Sequence[int], dattn_layers: Sequence[int] = ()
                         ) -> "VisionStreams":
        """Run all blocks on ``B x 3 x S x S`` images, keeping what the requested layers need.

        ``layers``: 1-indexed blocks whose tokens are wanted; ``dattn_layers``: blocks whose
        D-Attn input ``t`` is wanted. As in the published code (where in-place updates decide
        it), ``t`` of a dual-path block is its stream right after its attention residual: at
        the first dual-path block the refined stream ``x + y_s``, at later blocks the original
        stream ``xo + y_o`` before the MLP (quirk 2); before the dual path, the block's input.
        """
        wanted, wanted_t = set(layers), set(dattn_layers)
        x = self.embed(x)
        own: dict[int, torch.Tensor] = {}
        inputs: dict[int, torch.Tensor] = {}
        xo, xs = x, None
        for idx, block in enumerate(self.visual.transformer.resblocks, start=1):
            if idx < self.eattn_start:
                if idx in wanted_t:
                    inputs[idx] = xo
                xo = block(xo)
                if idx in wanted:
                    own[idx] = xo
                continue
            y_o, y_s = self._dual_attention(block, xo)
            xs = (xo if xs is None else xs) + y_s
            xo = xo + y_o
            if idx in wanted_t:
                inputs[idx] = xs if idx == self.eattn_start else xo
            xo = xo + block.mlp(block.ln_2(xo))
            if idx in wanted:
                own[idx] = xs
        return VisionStreams(xo, own, xs, inputs, self.eattn_start if self.layer_aliasing else None)

    def dattn_values(self, t: torch.Tensor, layer: int, size: tuple[int, int]) -> torch.Tensor:
        """Values of block ``layer`` from ``ln_1(t)``, class token dropped, resized to ``size``: ``B x HW x D``."""
        block = self.visual.transformer.resblocks[layer - 1]
        d = t.shape[-1]
        attn = block.attn
        v = F.linear(block.ln_1(t[:, 1:]), attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:])
        return resample_tokens(v, size)

    def dattn_tokens(self, t: torch.Tensor, layer: int, attn: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """D-Attn output ``Linear_out(A_d v)``: ``B x HW x D`` for ``attn`` of shape ``B x HW x HW``."""
        v = self.dattn_values(t, layer, size)
        out = self.visual.transformer.resblocks[layer - 1].attn.out_proj
        return F.linear(torch.bmm(attn.to(v.dtype), v), out.weight, out.bias)
