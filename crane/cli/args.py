"""Command-line flags shared by ``test.py``, ``train.py`` and ``python -m crane``.

The model flags are made from the one declaration, :data:`crane.settings.SETTINGS`
(:func:`add_setting_flags`), so their names, types, choices, defaults and help are the
same everywhere. Where a checkpoint (or thresholds file, or exported graph) may supply a
setting, its flag is left out of the parsed namespace unless typed (``argparse.SUPPRESS``):
:func:`explicit_flags` then tells exactly which settings the user gave, whatever their value.
"""
from __future__ import annotations

import argparse
from typing import Any, Collection, Optional

from crane import settings
from crane.data.meta import default_datasets_root
from crane.settings import PRECISIONS

_TRUE = ("true", "t", "yes", "y", "1", "on")
_FALSE = ("false", "f", "no", "n", "0", "off")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default once: not appended where the help already states it, nor when there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is argparse.SUPPRESS:
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


def _help(text: str, defaults_in_help: bool) -> str:
    """``text``, followed by the default when the parser's formatter does not print it itself."""
    return f"{text} (default: %(default)s)" if defaults_in_help else text


def add_bool_flag(group: argparse._ArgumentGroup, name: str, default: bool, help: str,
                  defaults_in_help: bool = False) -> None:
    """A boolean flag taking ``True``/``False`` (see :func:`str2bool`); alone it means ``True``."""
    group.add_argument(name, type=str2bool, nargs="?", const=True, default=default, metavar="True|False",
                       help=_help(help, defaults_in_help))


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def add_setting_flags(group: argparse._ArgumentGroup, context: str, *, defaults_in_help: bool = False,
                      suppressed: Collection[str] = (), roles: Optional[Collection[str]] = None,
                      defaults: Optional[dict[str, Any]] = None) -> None:
    """The flags of the settings ``context`` offers (:meth:`crane.settings.Setting.offered_in`), weights first.

    ``suppressed``: settings left out of the namespace unless typed (their default is applied later, after
    the checkpoint's: :func:`fill_settings`); the help says where their default comes from. ``roles``: only
    these roles. ``defaults``: other defaults for this command (``init-checkpoint``'s synthetic CLIP).
    """
    for s in settings.SETTINGS:
        if not s.offered_in(context) or (roles is not None and s.role not in roles):
            continue
        default = (defaults or {}).get(s.name, s.default_for(context))
        default = list(default) if isinstance(default, tuple) else default
        if s.name in suppressed:
            origin = "the checkpoint's setting" if s.name in settings.CHECKPOINT_KEYS and context != "train" else None
            if "(default: " in s.help:  # a tower-scaled default says its rule
                text = s.help.replace("(default: ", f"(default: {origin}, else ", 1) if origin else s.help
            else:
                text = f"{s.help} (default: {origin + ', else ' if origin else ''}{_shown(default)})" \
                    if default is not None else s.help
            default = argparse.SUPPRESS
        else:
            text = s.help if "(default" in s.help else _help(s.help, defaults_in_help and default is not None)
        kwargs: dict[str, Any] = {"default": default, "help": text}
        if s.type is bool:
            kwargs.update(type=str2bool, nargs="?", const=True, metavar="True|False")
        else:
            kwargs.update(type=s.type)
            if s.choices:
                kwargs["choices"] = s.choices
            if s.many:
                kwargs.update(nargs="+", metavar="L")
            elif s.role == "weights":
                kwargs["metavar"] = "W"
        group.add_argument(f"--{s.name}", **kwargs)


def add_reference_flags(group: argparse._ArgumentGroup, defaults_in_help: bool = False) -> None:
    """The flags of how a reference memory is built (:data:`crane.settings.REFERENCE_SETTINGS`)."""
    for s in settings.REFERENCE_SETTINGS:
        group.add_argument(f"--{s.name}", type=s.type, default=s.default, metavar=s.name.split("_")[-1].upper(),
                           help=_help(s.help, defaults_in_help))


def explicit_flags(args: argparse.Namespace) -> frozenset[str]:
    """The settings typed on the command line, among those :func:`add_setting_flags` suppressed."""
    return frozenset(k for k in settings.BY_NAME if k in vars(args))


def fill_settings(args: argparse.Namespace, context: str, offered_only: bool = False) -> None:
    """Give every setting ``args`` lacks its ``context`` default (after the checkpoint's were applied); the
    tower-scaled ones (:func:`crane.settings.tower_scaled`) for the depth of the run's CLIP tower.
    ``offered_only``: only the settings ``context`` has flags for (``train.py``'s options have no others)."""
    from crane.models.weights import tower_depth_of

    for name in ("clip_model", "clip_weights"):
        if not hasattr(args, name):
            setattr(args, name, settings.BY_NAME[name].default_for(context))
    depth = tower_depth_of(args.clip_model, args.clip_weights)
    for name, value in settings.defaults(context, offered_only, depth).items():
        if not hasattr(args, name):
            setattr(args, name, value)


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
