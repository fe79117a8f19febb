"""Which open_clip architectures Crane runs on (``--clip_model``), read from open_clip's own model configs.

Crane's E-Attn rewrites the attention of CLIP's residual attention blocks
(``nn.MultiheadAttention`` with a packed ``in_proj``, no layer scale) and reads the class
token for the image embedding; its prompts run through CLIP's causal text transformer and
are read at the end-of-text token. So a tower fits when its open_clip config is a plain CLIP
ViT: vision ``layers``/``width``/``patch_size`` (optionally ``head_width``, ``mlp_ratio``),
a text transformer of open_clip's own (no Hugging Face text model or tokenizer), no
attention pooling, no average pooling, no layer scale, no ``ln_pre`` removal.

Out, with the reason :func:`clip_model_problem` gives: SigLIP / SigLIP2 (a timm tower with
attention pooling and no class token, a last-token text pool without a causal mask, a
sigmoid bias), EVA / PE-Core / ViTamin / MobileCLIP / ConvNeXt / ResNet (timm or non-ViT
towers), CLIPA (average pooling, no ``ln_pre``, its own tokenizer), CoCa (a decoder
besides), multilingual towers (Hugging Face text models).

Reading a config needs no torch: the JSON files ship inside the open_clip package.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from crane.settings import DEFAULT_CLIP_MODEL

_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}


@dataclass(frozen=True)
class Tower:
    """The shapes of one open_clip CLIP ViT (``name``) as its config gives them."""

    name: str
    depth: int
    width: int
    patch: int
    image_size: int
    head_width: int
    text_width: int
    text_heads: int
    context_length: int
    embed_dim: int
    quick_gelu: bool
    config: dict

    @property
    def heads(self) -> int:
        """Attention heads of the vision blocks."""
        return self.width // self.head_width


def _config_folder() -> Optional[Path]:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model_configs"


@functools.lru_cache(maxsize=None)
def _read(name: str) -> Optional[dict]:
    folder = _config_folder()
    path = folder / f"{name}.json" if folder is not None else None
    if path is None or "/" in name or not path.is_file():
        return None
    return json.loads(path.read_text())


def _unfit(config: dict) -> Optional[str]:
    """Why an open_clip config is not a plain CLIP ViT (``None`` when it is)."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if "timm_model_name" in vision:
        return f"its vision tower is timm's {vision['timm_model_name']} (not CLIP residual attention blocks)"
    if not isinstance(vision.get("layers"), int):
        return "its vision tower is not a ViT (ResNet/ConvNeXt)"
    extra = sorted((set(vision) - _VISION_KEYS) | (set(text) - _TEXT_KEYS) | (set(config) - _TOP_KEYS))
    if extra:
        return (f"it sets {', '.join(extra)} (attention/average pooling, no class token, layer scale, a Hugging "
                "Face text tower or tokenizer, a decoder), which E-Attn and the prompt learner do not follow")
    return None


def supported_clip_models() -> list[str]:
    """Every open_clip architecture name :func:`clip_model_problem` accepts, sorted."""
    folder = _config_folder()
    names = sorted(p.stem for p in folder.glob("*.json")) if folder is not None else []
    return [n for n in names if _unfit(_read(n)) is None]


def clip_model_problem(name: str) -> Optional[str]:
    """One line saying why ``--clip_model name`` cannot be used (``None`` when it can)."""
    config = _read(str(name))
    if config is None:
        near = [n for n in supported_clip_models() if n.lower().startswith(str(name).lower()[:5])][:8]
        return (f"--clip_model {name} is not an open_clip architecture"
                + (f" (similar: {', '.join(near)})" if near else "") + "; see `open_clip.list_models()`")
    why = _unfit(config)
    if why:
        return f"--clip_model {name} is not supported: {why}; use a CLIP ViT such as ViT-B-16 or {DEFAULT_CLIP_MODEL}"
    return None


@functools.lru_cache(maxsize=None)
def tower(name: str = DEFAULT_CLIP_MODEL) -> Tower:
    """The :class:`Tower` of ``name``; ``ValueError`` (one line) for names :func:`clip_model_problem` refuses."""
    problem = clip_model_problem(name)
    if problem:
        from .errors import ModelSettingsError

        raise ModelSettingsError(problem)
    config = _read(name)
    vision, text = config["vision_cfg"], config["text_cfg"]
    return Tower(name=name, depth=int(vision["layers"]), width=int(vision["width"]), patch=int(vision["patch_size"]),
                 image_size=int(vision["image_size"]), head_width=int(vision.get("head_width", 64)),
                 text_width=int(text["width"]), text_heads=int(text["heads"]),
                 context_length=int(text.get("context_length", 77)), embed_dim=int(config["embed_dim"]),
                 quick_gelu=bool(config.get("quick_gelu", False)), config=config)


def tower_depth(name: str) -> Optional[int]:
    """Blocks of ``name``'s vision tower, ``None`` for a name :func:`clip_model_problem` refuses."""
    return None if clip_model_problem(name) else tower(name).depth


def usual_image_size(name: str) -> int:
    """The side at which a tower is compared with others: 518 for /14 towers, 512 for /16 (37 / 32 patches)."""
    patch = tower(name).patch
    return {14: 518, 16: 512}.get(patch, 512 // patch * patch)
