"""Building the frozen CLIP model (``--clip_model``, default OpenAI ViT-L/14@336) with open_clip.

Three sources are accepted:

* ``"openai"`` or another open_clip pretrained tag of the tower (``laion2b_s34b_b88k``,
  ``dfn2b``, ...) — found where open_clip downloads it: OpenAI's ``~/.cache/clip/FILE`` (tags
  with an OpenAI URL), else the Hugging Face cache of the tag's hub repository
  (``timm/vit_large_patch14_clip_336.openai`` for the default); the hub is probed once,
  briefly, so an offline machine fails within seconds with the file, where to put it and the flag;
* a file path — an OpenAI TorchScript archive (``ViT-L-14-336px.pt``) or a plain
  state dict in ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors``;
* an in-memory OpenAI-format state dict.

The sizes (widths, depths, patch size, native resolution, MLP ratio) are inferred from the
tensors, so narrow synthetic towers build as well as the real ones; what tensors cannot tell
comes from the tower's open_clip config: the attention head width, and the activation
(QuickGELU for a pretrained tag that was trained with it, for an architecture whose config
says so, and for files of an architecture OpenAI released — the default's ``ViT-L-14-336px.pt``
— as today; GELU otherwise).
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from crane.settings import DEFAULT_CLIP_MODEL

from .errors import WeightsNotFoundError
from .hub import download_hf
from .towers import tower

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


def _mlp_ratio(sd: Mapping[str, torch.Tensor], prefix: str, width: int) -> float:
    fc = sd.get(f"{prefix}transformer.resblocks.0.mlp.c_fc.weight")
    return float(fc.shape[0]) / width if fc is not None else 4.0


def _heads(width: int, head_width: int) -> int:
    return width // head_width if width % head_width == 0 else max(1, width // 64)


def clip_config_from_state_dict(sd: Mapping[str, torch.Tensor], model: str = DEFAULT_CLIP_MODEL) -> dict:
    """Infer the CLIP architecture from OpenAI-format tensors (any width, depth, patch, MLP ratio); the head
    width comes from ``model``'s open_clip config (64 for every tower but ViT-H/g/bigG)."""
    if "visual.conv1.weight" not in sd or "visual.proj" not in sd:
        raise ValueError("not an OpenAI ViT CLIP state dict: 'visual.conv1.weight' / 'visual.proj' are missing")
    vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
    vision_layers = len([k for k in sd if k.startswith("visual.transformer.resblocks.") and k.endswith(".attn.in_proj_weight")])
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    text_layers = len([k for k in sd if k.startswith("transformer.resblocks.") and k.endswith(".attn.in_proj_weight")])
    t = tower(model)
    head_width = t.head_width if int(vision_width) % t.head_width == 0 else 64
    text_heads = t.text_heads if int(text_width) == t.text_width else _heads(int(text_width), 64)
    return dict(
        embed_dim=int(sd["text_projection"].shape[1]),
        vision_cfg=CLIPVisionCfg(layers=vision_layers, width=int(vision_width), patch_size=int(patch),
                                 image_size=int(patch * grid), head_width=head_width,
                                 mlp_ratio=_mlp_ratio(sd, "visual.", int(vision_width))),
        text_cfg=CLIPTextCfg(context_length=int(sd["positional_embedding"].shape[0]),
                             vocab_size=int(sd["token_embedding.weight"].shape[0]),
                             width=int(text_width), heads=text_heads, layers=text_layers,
                             mlp_ratio=_mlp_ratio(sd, "", int(text_width))),
    )


def file_quick_gelu(model: str) -> bool:
    """The activation of a weights file (or state dict) of ``model``: QuickGELU when the config says so or
    OpenAI released the architecture (its files are OpenAI's, as ``ViT-L-14-336px.pt``), else GELU."""
    import open_clip

    return tower(model).quick_gelu or "openai" in open_clip.list_pretrained_tags_by_model(model)


def build_clip_from_state_dict(state_dict: Mapping[str, torch.Tensor], model: str = DEFAULT_CLIP_MODEL,
                               quick_gelu: Optional[bool] = None) -> CLIP:
    """An fp32, eval-mode, frozen open_clip ``CLIP`` of ``model``'s family holding ``state_dict``
    (``quick_gelu=None``: :func:`file_quick_gelu`)."""
    sd = {k: v for k, v in state_dict.items() if k not in _NON_TENSOR_KEYS}
    quick = file_quick_gelu(model) if quick_gelu is None else quick_gelu
    model = CLIP(**clip_config_from_state_dict(sd, model), quick_gelu=quick)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if k != "logit_bias"]
    if missing or unexpected:
        raise ValueError(f"CLIP state dict does not fit the inferred architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval().requires_grad_(False)
    return model


def resolve_openai_weights(cache_dir: str | None = None) -> str:
    """Path of the OpenAI ViT-L/14@336px weights: OpenAI's cache, else the HF cache or hub."""
    return resolve_pretrained(DEFAULT_CLIP_MODEL, "openai", cache_dir)


def pretrained_cfg(model: str, tag: str) -> dict:
    """open_clip's record of the pretrained ``tag`` of ``model`` (``{}`` when it has no such tag)."""
    import open_clip

    return dict(open_clip.get_pretrained_cfg(model, tag) or {})


def pretrained_hint(model: str, tag: str) -> str:
    """Where the weights of ``model`` + ``tag`` go, and the flag, for the missing-weights message."""
    if model == DEFAULT_CLIP_MODEL and tag == "openai":
        return OPENAI_HINT
    cfg = pretrained_cfg(model, tag)
    repo = cfg.get("hf_hub", "").strip("/")
    url_file = os.path.basename(cfg.get("url", "")) if cfg.get("url") else ""
    where = [f"fill the Hugging Face cache with `huggingface-cli download {repo} {OPENAI_HF_FILES[0]}` on a "
             "machine with internet (then copy the cache)"] if repo else []
    if url_file:
        where.append(f"copy `{url_file}` to ~/.cache/clip/{url_file}")
    return (f"--clip_model {model} --clip_weights {tag} needs those weights. Either\n  * "
            + ",\n  * or ".join(where) + f",\n  * or pass `--clip_weights /path/to/the/weights` with "
            f"`--clip_model {model}` (Python: `clip_weights=PATH, clip_model={model!r}`).")


def resolve_pretrained(model: str, tag: str, cache_dir: str | None = None) -> str:
    """Path of ``model``'s pretrained ``tag`` weights: OpenAI's ``~/.cache/clip`` (tags with an OpenAI URL),
    else the Hugging Face cache or hub (failing fast offline with :func:`pretrained_hint`)."""
    cfg = pretrained_cfg(model, tag)
    if not cfg:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(model)
        raise WeightsNotFoundError(f"--clip_weights {tag}: not a file, 'synthetic', nor a pretrained tag of "
                                   f"--clip_model {model} (its tags: {', '.join(tags) or 'none'})")
    if cfg.get("url"):
        local = OPENAI_CLIP_CACHE.expanduser().parent / os.path.basename(cfg["url"])
        if local.is_file():
            return str(local)
    repo = cfg.get("hf_hub", "").strip("/")
    hint = pretrained_hint(model, tag)
    if not repo:
        raise WeightsNotFoundError(f"{model} {tag} weights were not found.\n{hint}")
    what = "OpenAI CLIP ViT-L/14@336px" if (model, tag) == (DEFAULT_CLIP_MODEL, "openai") else f"CLIP {model} {tag}"
    return download_hf(repo, OPENAI_HF_FILES, cache_dir, what, hint)


def tag_quick_gelu(model: str, tag: str) -> bool:
    """The activation the pretrained ``tag`` of ``model`` was trained with (QuickGELU: True)."""
    return bool(pretrained_cfg(model, tag).get("quick_gelu", False)) or tower(model).quick_gelu


def load_clip(weights: ClipWeights = "openai", cache_dir: str | None = None, model: str = DEFAULT_CLIP_MODEL) -> CLIP:
    """Build the frozen CLIP model of architecture ``model`` from a pretrained tag (``"openai"``), a file
    path or a state dict (sizes from the tensors, head width and activation from ``model``: module docstring)."""
    quick = None
    if isinstance(weights, Mapping):
        sd = weights
    else:
        path = os.fspath(weights)
        if os.path.isfile(os.path.expanduser(path)):
            sd = read_state_dict(path)
        elif pretrained_cfg(model, path) or path == "openai":
            quick = tag_quick_gelu(model, path)
            sd = read_state_dict(resolve_pretrained(model, path, cache_dir))
        else:
            raise WeightsNotFoundError(f"CLIP weights file not found: {path}\n{OPENAI_HINT}")
    return build_clip_from_state_dict(sd, model, quick)
