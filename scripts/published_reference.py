"""The published Crane / Crane+ test-time arithmetic, written plainly (a slow reference).

Written from ``docs/method.md`` (§1-5), independently of
``crane.models``, the way the original code computes it:

* sequence-first layout (``N x B x D``) as in OpenAI's CLIP code;
* standard blocks (vision blocks before the dual path, the text tower) through
  ``F.multi_head_attention_forward``, as ``nn.MultiheadAttention`` runs them;
* E-Attn blocks with materialised ``N x N`` softmax attention matrices
  (``A_o``, ``A_s``) summed before they multiply ``v``;
* the in-place updates of the original code, so that its quirks arise the same
  way: the refined stream ``xs`` is updated in place, so every requested E-Attn
  layer holds the block-24 refined tokens (quirk 1), and the original stream is
  updated in place by the attention residual, so the D-Attn input ``t`` that was
  taken at a block's entry ends up as ``xo + y_o`` (quirk 2; at the first dual-path
  block, where the refined stream is born in place, ``x + y_s``);
* with a VFM, a D-Attn token set at every requested layer, the sets in block order;
* the D-Attn similarity mean over the whole batch (quirk 3);
* deep text prompts cast to float16 before they are inserted (quirk 4).

Used by the unit tests (``tests/test_model_units.py``) and the speed benchmark
(``scripts/bench_predict.py``)::

    ref = PublishedCrane(clip_sd, prompt_sd, features_list=(6, 12, 18, 24), soft_mean=True)
    out = ref.predict(preprocess(path, 518)[None])   # dict of numpy arrays
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter
from torchvision import transforms

StateDict = Mapping[str, torch.Tensor]
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TAU = 0.07


def preprocess(image, size: int) -> torch.Tensor:
    """Published test transform: resize (PIL bicubic) to ``size x size``, RGB, ToTensor, normalise: ``3 x S x S``."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        image = Image.open(image)
    transform = transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.ToTensor(),
        transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])
    return transform(image)


def interpolate_positional_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """``(1 + n*n) x D`` -> ``(1 + grid*grid) x D``: patch part bilinear (align_corners=False), class kept."""
    n = int(round((pos.shape[0] - 1) ** 0.5))
    if n == grid:
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bilinear", align_corners=False)
    patch_pos = patch_pos.squeeze(0).permute(1, 2, 0).reshape(grid * grid, -1)
    return torch.cat([cls_pos, patch_pos], dim=0)


def _layer_norm(x: torch.Tensor, sd: StateDict, name: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], 1e-5)


def _mlp(x: torch.Tensor, sd: StateDict, block: str) -> torch.Tensor:
    h = F.linear(x, sd[block + "mlp.c_fc.weight"], sd[block + "mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return F.linear(h, sd[block + "mlp.c_proj.weight"], sd[block + "mlp.c_proj.bias"])


def _heads(sd: StateDict, block: str) -> int:
    return sd[block + "attn.out_proj.weight"].shape[0] // 64


def standard_block(x: torch.Tensor, sd: StateDict, block: str, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A CLIP residual block on ``N x B x D`` through ``nn.MultiheadAttention``'s functional form."""
    h = _layer_norm(x, sd, block + "ln_1")
    d = x.shape[-1]
    y, _ = F.multi_head_attention_forward(
        h, h, h, d, _heads(sd, block), sd[block + "attn.in_proj_weight"], sd[block + "attn.in_proj_bias"],
        None, None, False, 0.0, sd[block + "attn.out_proj.weight"], sd[block + "attn.out_proj.bias"],
        training=False, need_weights=False, attn_mask=attn_mask)
    x = x + y
    return x + _mlp(_layer_norm(x, sd, block + "ln_2"), sd, block)


def attention_matrices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_type: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised ``(A_s, A_o)``, each ``B*h x N x N``, from ``B*h x N x hd`` projections."""
    scale = q.shape[-1] ** -0.5
    a_o = torch.softmax((q @ k.transpose(1, 2)) * scale, dim=-1)

    def corr(t: torch.Tensor, s: float = scale) -> torch.Tensor:
        return torch.softmax((t @ t.transpose(1, 2)) * s, dim=-1)

    if attn_type == "qq+kk+vv":
        a_s = corr(v) + corr(k) + corr(q)
    elif attn_type == "qq+kk":
        a_s = corr(k) + corr(q)
    elif attn_type == "qq":
        a_s = corr(q)
    elif attn_type == "kk":
        a_s = corr(k)
    elif attn_type == "vv":
        a_s = corr(v)
    elif attn_type == "(q+k+v)^2":
        a_s = corr(torch.cat([q, k, v], dim=-1), scale / 3 ** 0.5)
    else:
        raise ValueError(f"unknown attn_type {attn_type!r}")
    return a_s, a_o


def dual_attention(x: torch.Tensor, sd: StateDict, block: str, attn_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """E-Attn of one block on ``ln_1``-normalised ``N x B x D`` input: ``(y_s, y_o)``, each ``N x B x D``."""
    n, b, d = x.shape
    heads = _heads(sd, block)
    hd = d // heads
    qkv = F.linear(x, sd[block + "attn.in_proj_weight"], sd[block + "attn.in_proj_bias"])
    q, k, v = (t.reshape(n, b * heads, hd).transpose(0, 1) for t in qkv.chunk(3, dim=-1))
    a_s, a_o = attention_matrices(q, k, v, attn_type)
    w, bias = sd[block + "attn.out_proj.weight"], sd[block + "attn.out_proj.bias"]
    y_s = F.linear((a_s @ v).transpose(0, 1).reshape(n, b, d), w, bias)
    y_o = F.linear((a_o @ v).transpose(0, 1).reshape(n, b, d), w, bias)
    return y_s, y_o


@dataclass
class VisionResult:
    """Sequence-first outputs: ``xo`` (``N x B x D``), ``tokens`` (one ``N x B x D`` per requested
    layer, in block order, as the original code collects them) and ``ts`` (the D-Attn input of
    each requested D-Attn layer, as it is when the original code computes D-Attn there)."""

    xo: torch.Tensor
    tokens: list[torch.Tensor]
    ts: dict[int, torch.Tensor]


def vision_transformer(sd: StateDict, images: torch.Tensor, out_layers: Sequence[int], attn_type: str = "qq+kk+vv",
                       eattn_layers: int = 19, dattn_layers: Sequence[int] = (),
                       snapshot_tokens: bool = False) -> VisionResult:
    """The CLIP vision tower with the E-Attn dual path on ``B x 3 x S x S`` images.

    ``snapshot_tokens`` copies each requested layer's refined stream instead of keeping the
    live tensor: NOT the published behaviour (which aliases them, quirk 1), the ablation of it.
    """
    conv = sd["visual.conv1.weight"]
    patch = conv.shape[-1]
    x = F.conv2d(images, conv, stride=patch)
    b, d, g, _ = x.shape
    x = x.reshape(b, d, g * g).permute(0, 2, 1)
    cls = sd["visual.class_embedding"] + torch.zeros(b, 1, d, dtype=x.dtype)
    x = torch.cat([cls, x], dim=1) + interpolate_positional_embedding(sd["visual.positional_embedding"], g)
    x = _layer_norm(x, sd, "visual.ln_pre").permute(1, 0, 2)  # N x B x D

    depth = len([k for k in sd if k.startswith("visual.transformer.resblocks.") and k.endswith("attn.in_proj_weight")])
    eattn_start = max(1, depth - eattn_layers + 1)
    tokens: list[torch.Tensor] = []
    ts: dict[int, torch.Tensor] = {}
    xs: Optional[torch.Tensor] = None
    xo = x
    for idx in range(1, depth + 1):
        block = f"visual.transformer.resblocks.{idx - 1}."
        if idx < eattn_start:
            if idx in dattn_layers:
                ts[idx] = xo  # the block's input (the original code has no D-Attn here: it needs E-Attn weights)
            xo = standard_block(xo, sd, block)
        elif xs is None:  # start of the dual path
            y_s, y_o = dual_attention(_layer_norm(xo, sd, block + "ln_1"), sd, block, attn_type)
            xs = xo + y_s  # the original adds y_s in place to the block's input stream
            if idx in dattn_layers:
                ts[idx] = xs.clone()  # D-Attn runs now; later in-place updates must not reach it
            xo = xo + y_o
            xo = xo + _mlp(_layer_norm(xo, sd, block + "ln_2"), sd, block)
        else:
            if idx in dattn_layers:
                ts[idx] = xo  # held by D-Attn; the in-place residual below changes it (quirk 2)
            y_s, y_o = dual_attention(_layer_norm(xo, sd, block + "ln_1"), sd, block, attn_type)
            xo += y_o
            xo = xo + _mlp(_layer_norm(xo, sd, block + "ln_2"), sd, block)
            xs += y_s  # in place: earlier collected layers see it too (quirk 1)
        if idx in out_layers:
            stream = xo if xs is None else xs
            tokens.append(stream.clone() if snapshot_tokens else stream)
    return VisionResult(xo, tokens, ts)


def dattn_matrix(features: torch.Tensor, beta: float = 1.2, gamma: float = 3.0) -> torch.Tensor:
    """``A_d`` (``B x HW x HW``) from VFM features ``B x C x H x W``, with the batch-wide mean (quirk 3)."""
    b, c, h, w = features.shape
    f = F.normalize(features.reshape(b, c, h * w), dim=1)
    sim = f.transpose(1, 2) @ f
    m = (sim - beta * sim.mean()) * gamma
    m[m < 0] = float("-inf")
    return torch.softmax(m, dim=-1)


def dattn_tokens(sd: StateDict, t: torch.Tensor, layer: int, attn: torch.Tensor) -> torch.Tensor:
    """D-Attn output ``Linear_out(A_d v)``: ``B x HW x D`` from ``t`` (``N x B x D``) and ``A_d``."""
    block = f"visual.transformer.resblocks.{layer - 1}."
    d = t.shape[-1]
    h = _layer_norm(t, sd, block + "ln_1")
    v = F.linear(h, sd[block + "attn.in_proj_weight"][2 * d:], sd[block + "attn.in_proj_bias"][2 * d:])
    v = v[1:].permute(1, 2, 0)  # B x D x g*g
    b = v.shape[0]
    g = int(round(v.shape[-1] ** 0.5))
    hw = attn.shape[-1]
    side = int(round(hw ** 0.5))
    if side != g:
        v = F.interpolate(v.reshape(b, d, g, g), size=(side, side), mode="bilinear", align_corners=False)
    v = v.reshape(b, d, hw).transpose(1, 2)
    return F.linear(attn @ v, sd[block + "attn.out_proj.weight"], sd[block + "attn.out_proj.bias"])


class Dinov2Features:
    """DINOv2 ViT-B/14 (4 registers) dense features from a timm-layout state dict (native 518),
    run at any size through timm's dynamic position-embedding resize, as the hub model does."""

    def __init__(self, state_dict: StateDict) -> None:
        import timm

        self.model = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                                       img_size=518, dynamic_img_size=True)
        self.model.load_state_dict(dict(state_dict), strict=True)
        self.model.eval().requires_grad_(False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised ``B x 3 x S x S`` -> ``B x 768 x S/14 x S/14``."""
        x = images * torch.tensor(OPENAI_STD).view(1, 3, 1, 1) + torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
        x = (x.clamp(0, 1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return self.model.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]


def text_features(sd: StateDict, prompt_sd: StateDict) -> torch.Tensor:
    """Normalised [normal, anomalous] text features ``1 x 2 x E`` from a 16-key prompt-learner state dict."""
    deep = [prompt_sd[f"compound_prompts_text.{i}"] for i in range(len([k for k in prompt_sd if k.startswith("compound")]))]
    layers = len([k for k in sd if k.startswith("transformer.resblocks.") and k.endswith("attn.in_proj_weight")])
    feats = []
    for state in ("pos", "neg"):
        x = torch.cat([prompt_sd[f"token_prefix_{state}"][0], prompt_sd[f"ctx_{state}"][0],
                       prompt_sd[f"token_suffix_{state}"][0]], dim=1)  # 1 x 77 x W
        ids = prompt_sd[f"tokenized_prompts_{state}"][0]
        x = (x + sd["positional_embedding"]).permute(1, 0, 2)  # 77 x 1 x W
        n = x.shape[0]
        mask = torch.full((n, n), float("-inf")).triu_(1)
        for i in range(layers):
            if 1 <= i <= len(deep):
                ctx = deep[i - 1].expand(x.shape[1], -1, -1).permute(1, 0, 2).half()
                x = torch.cat([x[:1], ctx, x[1 + ctx.shape[0]:]], dim=0)  # float16 promoted back (quirk 4)
            x = standard_block(x, sd, f"transformer.resblocks.{i}.", attn_mask=mask)
        x = _layer_norm(x.permute(1, 0, 2), sd, "ln_final")
        feats.append(x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"])
    return F.normalize(torch.stack(feats, dim=1), dim=-1)


class PublishedCrane:
    """The published test-time pipeline: images -> patch probabilities, maps and scores.

    Args:
        clip_sd: OpenAI-format CLIP state dict (float32).
        prompt_sd: the official 16-key prompt-learner state dict.
        dino_sd: timm-layout DINOv2 state dict for Crane+ (D-Attn at every requested layer), or None.
        Other arguments as the original flags; ``eattn_layers`` is the original 19.
    """

    def __init__(self, clip_sd: StateDict, prompt_sd: StateDict, features_list: Sequence[int] = (24,),
                 image_size: int = 518, soft_mean: bool = False, attn_type: str = "qq+kk+vv",
                 dino_sd: Optional[StateDict] = None, sigma: float = 4.0, both_eattn_dattn: bool = True,
                 use_scorebase_pooling: bool = True, eattn_layers: int = 19, gamma: float = 3.0) -> None:
        self.sd = {k: v.float() for k, v in clip_sd.items() if isinstance(v, torch.Tensor) and v.ndim > 0}
        self.features_list = list(features_list)
        self.image_size = image_size
        self.soft_mean = soft_mean
        self.attn_type = attn_type
        self.sigma = sigma
        self.both_eattn_dattn = both_eattn_dattn
        self.use_scorebase_pooling = use_scorebase_pooling
        self.eattn_layers = eattn_layers
        self.gamma = gamma
        self.vfm = Dinov2Features(dino_sd) if dino_sd is not None else None
        self.depth = len([k for k in self.sd if k.startswith("visual.transformer.resblocks.") and k.endswith("in_proj_weight")])
        with torch.no_grad():
            self.text = text_features(self.sd, prompt_sd)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised image embedding ``B x E`` and token sets ``B x L x E`` (D-Attn set first at its layer)."""
        sd = self.sd
        layers = sorted(set(self.features_list))  # the original collects layers as it runs the blocks
        dattn_layers = layers if self.vfm is not None else ()
        res = vision_transformer(sd, images, layers, self.attn_type, self.eattn_layers, dattn_layers)
        embedding = _layer_norm(res.xo[0], sd, "visual.ln_post") @ sd["visual.proj"]
        attn = dattn_matrix(self.vfm(images), gamma=self.gamma) if self.vfm is not None else None
        sets = []
        for layer, tok in zip(layers, res.tokens):
            if attn is not None:
                sets.append(_layer_norm(dattn_tokens(sd, res.ts[layer], layer, attn), sd, "visual.ln_post") @ sd["visual.proj"])
                if not self.both_eattn_dattn:
                    continue
            sets.append(_layer_norm(tok.permute(1, 0, 2)[:, 1:], sd, "visual.ln_post") @ sd["visual.proj"])
        return F.normalize(embedding, dim=-1), [F.normalize(s, dim=-1) for s in sets]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """``B x 3 x S x S`` preprocessed images -> ``image_features`` ``B x E``, ``patch_probs``
        ``Lsets x B x L x 2``, ``anomaly_map_raw`` / ``anomaly_map`` ``B x S x S``, ``score`` ``B``."""
        embedding, sets = self.encode_image(images)
        text = self.text
        logits = [s @ text.transpose(-1, -2) / TAU for s in sets]
        b, n_tok, _ = logits[0].shape
        size = self.image_size

        def up(p: torch.Tensor) -> torch.Tensor:
            side = int(round(p.shape[1] ** 0.5))
            grid = p.permute(0, 2, 1).reshape(b, 2, side, side)
            return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)

        if self.soft_mean:
            maps = torch.stack([up(p.softmax(-1)) for p in logits]).mean(0)
        else:
            maps = torch.stack([up(p) for p in logits]).mean(0).softmax(1)
        raw = maps[:, 1].numpy()

        if self.use_scorebase_pooling:
            w = torch.stack(logits).mean(0).softmax(-1)[:, :, 1:]
            c = F.normalize((torch.stack(sets).mean(0) * w).sum(1), dim=-1)
            z = F.normalize(0.5 * c + 0.5 * embedding, dim=-1)
        else:
            z = embedding
        score = ((z.unsqueeze(1) @ text.transpose(-1, -2)) / TAU)[:, 0].softmax(-1)[:, 1]
        return {
            "image_features": embedding.numpy(),
            "patch_probs": np.stack([p.softmax(-1).numpy() for p in logits]),
            "anomaly_map_raw": raw,
            "anomaly_map": np.stack([gaussian_filter(m, sigma=self.sigma) for m in raw]).astype(np.float32),
            "score": score.numpy(),
        }
