"""What the model commands (``predict``, ``calibrate``, ``export``, the app) share: their model flags and
how a run settles its model before any model work."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping

from crane.checkpoints import CheckpointInfo, named_checkpoint
from crane.cli.args import add_bool_flag, add_precision_flags, add_setting_flags
from crane.cli.setup import describe_model, settle_model
from crane import settings

EXIT_ERROR, EXIT_SKIPPED = 1, 3
"""Exit status of an error that is not the input's fault, and of a run that skipped unreadable files
(2, unusable input, and 130, interrupted, are :mod:`crane.errors`')."""
DEFAULT_RUN = "trained_on_mvtec_cranep"


def add_model_flags(parser: argparse.ArgumentParser, run_flags: bool = True) -> None:
    """``--checkpoint`` (or ``--model_name``/``--epoch``), the weights and model settings of the ``inspect``
    context (each left out of the namespace unless typed, so the checkpoint's settings can fill the rest),
    ``--force``; with ``run_flags``, ``--device``, the precision flags and ``--batch_size``."""
    g = parser.add_argument_group("model (settings the checkpoint records are taken from it unless given)")
    g.add_argument("--checkpoint", metavar="FILE",
                   help="prompt-learner checkpoint file (default: checkpoints/MODEL_NAME/epoch_EPOCH.pth)")
    g.add_argument("--model_name", default=DEFAULT_RUN,
                   help=f"checkpoint folder under checkpoints/ (default: {DEFAULT_RUN})")
    g.add_argument("--epoch", type=int, default=5, help="checkpoint epoch (default: 5)")
    add_setting_flags(g, "inspect", suppressed=settings.names())
    add_bool_flag(g, "--force", False, "run with model flags that contradict the checkpoint's settings (and, in "
                                       "predict, with thresholds calibrated for other settings): a warning instead "
                                       "of an error", defaults_in_help=True)
    if not run_flags:
        return
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, N or auto (GPU when available) "
                                                    "(default: auto)")
    add_precision_flags(g, defaults_in_help=True)
    g.add_argument("--batch_size", type=int, default=8, help="images per forward pass (default: 8)")


def add_bit_depth_flag(parser: argparse.ArgumentParser) -> None:
    """``--bit_depth B`` of the commands that read plain image files (``predict``, ``calibrate``)."""
    from crane.data.image import BIT_DEPTHS

    parser.add_argument("--bit_depth", type=int, choices=BIT_DEPTHS, default=16, metavar="B",
                        help="the bits a 16-bit image file really holds: 12 for 12-bit camera data in 16-bit PNG or "
                             "TIFF files, read as value >> (B - 8) with values above B bits clipped; 16 reads "
                             "16-bit files as value >> 8 (default: 16)")


def checkpoint_of(args: argparse.Namespace) -> str:
    """``--checkpoint``, else ``checkpoints/MODEL_NAME/epoch_EPOCH.pth`` (here, else the shipped one:
    :func:`crane.checkpoints.named_checkpoint`)."""
    if args.checkpoint is None:
        args.checkpoint = str(named_checkpoint(args.model_name, args.epoch))
    return args.checkpoint


def settle(args: argparse.Namespace) -> tuple[Mapping[str, Any], CheckpointInfo]:
    """:func:`crane.cli.setup.settle_model` for a one-process command, printing its notes."""
    state, info, notes = settle_model(args)
    for note in notes:
        print(note, file=sys.stderr)
    return state, info


def load_detector(args: argparse.Namespace, state: Mapping[str, Any], info: CheckpointInfo):
    """The :class:`crane.Detector` of a settled run (one line says which model)."""
    from crane.detector import build_detector

    print(f"loading the model ({args.checkpoint}): {describe_model(args, info)} ...", file=sys.stderr)
    return build_detector(args, state)
