"""Building the frozen OpenAI CLIP model with open_clip.

Three sources are accepted:

* ``"openai"`` — the OpenAI ViT-L/14@336px weights through the Hugging Face
  cache (``timm/vit_large_patch14_clip_336.openai``), or OpenAI's own
  ``~/.cache/clip/ViT-L-14-336px.pt``;
* a file path — an OpenAI TorchScript archive (``ViT-L-14-336px.pt``) or a plain
  state dict in ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors``;
* an in-memory OpenAI-format state dict.

The architecture (widths, depths, patch size, native resolution) is inferred
from the tensors, so narrow synthetic towers build as well as ViT-L/14.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Union

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from .errors import WeightsNotFoundError
from .hub import download_hf

ClipWeights = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

OPENAI_HF_REPO = "timm/vit_large_patch14_clip_336.openai"
OPENAI_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPENAI_CLIP_CACHE = Path("~/.cache/clip/ViT-L-14-336px.pt")
_NON_TENSOR_KEYS = ("input_resolution", "context_length", "vocab_size")

OPENAI_HINT = (
    "Crane needs the OpenAI CLIP ViT-L/14@336px weights. Either\n"
    "  * run `bash scripts/download_weights.sh` on a machine with internet (fills the Hugging Face cache), or\n"
    "  * copy OpenAI's `ViT-L-14-336px.pt` to ~/.cache/clip/ViT-L-14-336px.pt, or anywhere and pass\n"
    "    `--clip_weights /path/to/ViT-L-14-336px.pt` (Python: `clip_weights=PATH`)."
)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder (OpenAI's ``ViT-L-14-336px.pt``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict.

    Handles TorchScript archives (OpenAI's ``.pt``), ``.safetensors``, and pickled
    state dicts, optionally nested under ``state_dict`` / ``model``.
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    if _is_torchscript(path):
        with warnings.catch_warnings():  # OpenAI's file is TorchScript; only its tensors are read
            warnings.filterwarnings("ignore", message=r"`?torch\.jit\.load`? is deprecated", category=FutureWarning)
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is neither a state dict nor a TorchScript archive: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(sd).__name__})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def clip_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
    """Infer the CLIP architecture from OpenAI-format tensors (any width, depth, patch)."""
    if "visual.conv1.weight" not in sd or "visual.proj" not in sd:
        raise ValueError("not an OpenAI ViT CLIP state dict: 'visual.conv1.weight' / 'visual.proj' are missing")
    vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
    vision_layers = len([k for k in sd if k.startswith("visual.transformer.resblocks.") and k.endswith(".attn.in_proj_weight")])
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    text_layers = len([k for k in sd if k.startswith("transformer.resblocks.") and k.endswith(".attn.in_proj_weight")])
    return dict(
        embed_dim=int(sd["text_projection"].shape[1]),
        vision_cfg=CLIPVisionCfg(layers=vision_layers, width=int(vision_width), patch_size=int(patch),
                                 image_size=int(patch * grid), head_width=64),
        text_cfg=CLIPTextCfg(context_length=int(sd["positional_embedding"].shape[0]),
                             vocab_size=int(sd["token_embedding.weight"].shape[0]),
                             width=int(text_width), heads=int(text_width) // 64, layers=text_layers),
    )


def build_clip_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> CLIP:
    """An fp32, eval-mode, frozen open_clip ``CLIP`` (QuickGELU) holding ``state_dict``."""
    sd = {k: v for k, v in state_dict.items() if k not in _NON_TENSOR_KEYS}
    model = CLIP(**clip_config_from_state_dict(sd), quick_gelu=True)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if k != "logit_bias"]
    if missing or unexpected:
        raise ValueError(f"CLIP state dict does not fit the inferred architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval().requires_grad_(False)
    return model


def resolve_openai_weights(cache_dir: str | None = None) -> str:
    """Path of the OpenAI ViT-L/14@336px weights: OpenAI's cache, else the HF cache or hub."""
    local = OPENAI_CLIP_CACHE.expanduser()
    if local.is_file():
        return str(local)
    return download_hf(OPENAI_HF_REPO, OPENAI_HF_FILES, cache_dir, "OpenAI CLIP ViT-L/14@336px", OPENAI_HINT)


def load_clip(weights: ClipWeights = "openai", cache_dir: str | None = None) -> CLIP:
    """Build the frozen CLIP model from ``"openai"``, a file path or a state dict."""
    if isinstance(weights, Mapping):
        return build_clip_from_state_dict(weights)
    path = os.fspath(weights)
    if path == "openai":
        path = resolve_openai_weights(cache_dir)
    elif not os.path.isfile(os.path.expanduser(path)):
        raise WeightsNotFoundError(f"CLIP weights file not found: {path}\n{OPENAI_HINT}")
    return build_clip_from_state_dict(read_state_dict(path))
