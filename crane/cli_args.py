"""Command-line flags shared by ``test.py``, ``train.py`` and ``python -m crane``.

Each script adds the groups it offers with the helpers below and passes its own
defaults (an object with one attribute per flag, such as ``EvalOptions()``), so
the flag names, types, choices and help stay the same everywhere.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Collection

from crane.checkpoints import MODEL_SETTING_KEYS
from crane.choices import ATTN_TYPES, AUPRO_METHODS, DINO_MODELS, IMAGE_TOKEN_TYPES, PRECISIONS

__all__ = ["ATTN_TYPES", "AUPRO_METHODS", "DINO_MODELS", "IMAGE_TOKEN_TYPES", "MAP_FLAGS", "PRECISIONS", "PROMPT_FLAGS",
           "add_bool_flag", "add_data_flags", "add_model_flags", "add_precision_flags", "add_weight_flags",
           "default_datasets_root", "explicit_flags", "HelpFormatter", "setup_logging", "str2bool", "INTERRUPTED",
           "LOG_FORMAT"]

MAP_FLAGS = ("soft_mean", "sigma")
"""Model flags that only shape the test-time maps (``train.py`` has none of them)."""
PROMPT_FLAGS = ("train_with_img_cls_prob", "train_with_img_cls_type", "n_ctx", "depth", "t_n_ctx")
"""Model flags of the prompt learner (``python -m crane`` reads them from the checkpoint)."""

_TRUE = ("true", "t", "yes", "y", "1", "on")
_FALSE = ("false", "f", "no", "n", "0", "off")


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT)."""


def setup_logging() -> None:
    """One log format for every entry point and process: crane's messages at INFO, other libraries'
    (open_clip's tokenizer lines, timm) only from WARNING up. Safe to call again in spawned processes."""
    import logging

    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("crane").setLevel(logging.INFO)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default once: not appended where the help already states it, nor when there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def str2bool(value: str) -> bool:
    """``True``/``False`` in the spellings the original scripts accepted (True, false, 1, 0, yes, no, ...)."""
    lowered = str(value).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def default_datasets_root() -> str:
    """``$CRANE_DATASETS``, else ``./datasets/data``."""
    return os.environ.get("CRANE_DATASETS", os.path.join(".", "datasets", "data"))


def _help(text: str, defaults_in_help: bool) -> str:
    """``text``, followed by the default when the parser's formatter does not print it itself."""
    return f"{text} (default: %(default)s)" if defaults_in_help else text


def add_bool_flag(group: argparse._ArgumentGroup, name: str, default: bool, help: str,
                  defaults_in_help: bool = False) -> None:
    """A boolean flag taking ``True``/``False`` (see :func:`str2bool`); alone it means ``True``."""
    group.add_argument(name, type=str2bool, nargs="?", const=True, default=default, metavar="True|False",
                       help=_help(help, defaults_in_help))


def add_model_flags(group: argparse._ArgumentGroup, defaults: Any, *, skip: Collection[str] = (),
                    defaults_in_help: bool = False, from_checkpoint: bool = False) -> None:
    """The model flags, with defaults read from the attribute of the same name of ``defaults``.

    ``skip`` leaves flags out (e.g. :data:`MAP_FLAGS` in ``train.py``); ``defaults_in_help``
    appends the default to each help text, for parsers without ``ArgumentDefaultsHelpFormatter``.
    ``from_checkpoint``: the settings a checkpoint records (:data:`crane.checkpoints.MODEL_SETTING_KEYS`)
    are left out of the parsed namespace unless given, so that :func:`explicit_flags` tells which
    were set and the rest can come from the checkpoint (:func:`crane.checkpoints.apply_settings`).
    """
    def default_of(name: str) -> Any:
        default = getattr(defaults, name)
        return list(default) if isinstance(default, tuple) else default  # as parsed nargs="+" values

    def text(name: str, help: str) -> str:
        if from_checkpoint and name in MODEL_SETTING_KEYS:
            shown = " ".join(map(str, default_of(name))) if isinstance(default_of(name), list) else default_of(name)
            return f"{help} (default: the checkpoint's setting, else {shown})"
        return _help(help, defaults_in_help)

    def default(name: str) -> Any:
        return argparse.SUPPRESS if from_checkpoint and name in MODEL_SETTING_KEYS else default_of(name)

    def add(name: str, help: str, **kwargs: Any) -> None:
        if name not in skip:
            group.add_argument(f"--{name}", default=default(name), help=text(name, help), **kwargs)

    def flag(name: str, help: str) -> None:
        if name not in skip:
            group.add_argument(f"--{name}", type=str2bool, nargs="?", const=True, default=default(name),
                               metavar="True|False", help=text(name, help))

    add("features_list", "CLIP blocks whose tokens are compared with the text (Crane: 6 12 18 24)", type=int,
        nargs="+", metavar="L")
    add("dino_model", "vision foundation model of D-Attn: none = Crane, dinov2 = Crane+", choices=DINO_MODELS)
    flag("soft_mean", "average softmaxed maps over layers (Crane: True), else softmax of averaged logits")
    add("image_size", "model input side S (maps are S x S)", type=int)
    add("sigma", "Gaussian smoothing of the maps", type=float)
    add("attn_type", "E-Attn self-correlation", choices=ATTN_TYPES)
    flag("both_eattn_dattn", "layer 24 gives both D-Attn and E-Attn tokens")
    flag("use_scorebase_pooling", "score-based pooling for the image score / logits")
    flag("dattn_batch_mean", "published D-Attn mean over the whole batch (quirk 3); makes results depend on "
                             "the batch")
    add("train_with_img_cls_prob", "probability of image-conditioned prompts: per step in training; at test 1 "
                                   "conditions them on each image, 0 is the published evaluation", type=float)
    add("train_with_img_cls_type", "where the image token goes when conditioning", choices=IMAGE_TOKEN_TYPES)
    add("n_ctx", "learnable context length", type=int)
    add("depth", "deep text prompt depth", type=int)
    add("t_n_ctx", "deep text prompt length", type=int)


def explicit_flags(args: argparse.Namespace) -> frozenset[str]:
    """The checkpoint-recorded model settings set on the command line (see ``from_checkpoint``)."""
    return frozenset(k for k in MODEL_SETTING_KEYS if k in vars(args))


def add_weight_flags(group: argparse._ArgumentGroup, clip_weights: str, defaults_in_help: bool = False) -> None:
    """``--clip_weights`` (default ``clip_weights``) and ``--dino_weights``."""
    group.add_argument("--clip_weights", default=clip_weights, metavar="W",
                       help=_help("'openai' (HF cache / ~/.cache/clip), a ViT-L-14-336px.pt file, or 'synthetic' "
                                  "(random weights: meaningless numbers, for pipeline demos)", defaults_in_help))
    group.add_argument("--dino_weights", default=None, metavar="W",
                       help="VFM weights for --dino_model: a file, or 'synthetic' (random weights: meaningless "
                            "numbers, for offline pipeline runs) (default: the torch hub / HF cache)")


def add_precision_flags(group: argparse._ArgumentGroup, precision: str = "fp32", compile: bool = False,
                        defaults_in_help: bool = False) -> None:
    """``--precision fp32|bf16|fp16`` and ``--compile`` (see :mod:`crane.models.precision`)."""
    group.add_argument("--precision", choices=PRECISIONS, default=precision,
                       help=_help("autocast dtype of the image side (CLIP vision tower, VFM); the text features and "
                                  "the head stay fp32. fp32 is the published arithmetic (use it to reproduce); bf16 "
                                  "and fp16 (GPU only) change the numbers slightly", defaults_in_help))
    add_bool_flag(group, "--compile", compile, "run the image side through torch.compile (the first batch pays the "
                                               "compilation; uncompiled, with a warning, where it fails)",
                  defaults_in_help)


def add_data_flags(group: argparse._ArgumentGroup, defaults: Any, k_shot_help: str = "keep K images per class (0: all)",
                   portion_help: str = "keep this fraction of each class") -> None:
    """``--datasets_root_dir``, ``--k_shot`` and ``--portion`` (``k_shot``, ``portion`` from ``defaults``;
    the help texts can differ: ``train.py`` selects as the published training does)."""
    group.add_argument("--datasets_root_dir", default=default_datasets_root(),
                       help="folder holding one folder per dataset (default: $CRANE_DATASETS, else ./datasets/data)")
    group.add_argument("--k_shot", type=int, default=defaults.k_shot, help=k_shot_help)
    group.add_argument("--portion", type=float, default=defaults.portion, help=portion_help)
