"""What the one-process commands (``predict``, ``calibrate``, ``export``, the app) settle before any model work.

* :func:`flag_errors`: one message per unusable run flag (batch size, rates, device, precision);
* :func:`settle_model`: read the checkpoint once, fill the model settings (flags, else the
  checkpoint's, else the defaults: :func:`crane.checkpoints.apply_settings`), then check them
  all with the one validator (:func:`crane.settings.problems`), the layers against the CLIP
  tower and the weights files (:func:`crane.models.weights.weights_problems`).

Everything here raises :class:`~crane.errors.CraneError` (or returns messages) with one line each,
so the command line reports them with exit code 2 within seconds.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Mapping

from crane import settings
from crane.checkpoints import CheckpointInfo, apply_settings, read_checkpoint
from crane.cli.args import explicit_flags, fill_settings
from crane.device import DeviceError, single_device
from crane.errors import CraneError
from crane.files import output_problem


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def flag_errors(args: argparse.Namespace) -> list[str]:
    """One message per unusable run flag of ``predict`` / ``calibrate`` (and the settings typed on the
    command line); resolves ``args.device``."""
    from crane.inspection.thresholds import parse_override

    errors = settings.problems(args, "inspect")  # the settings typed (the rest: settle_model)
    if args.batch_size < 1:
        errors.append(f"--batch_size must be at least 1, got {args.batch_size}")
    if getattr(args, "threshold", None):
        try:
            for which, value in zip(("image", "pixel"), parse_override(args.threshold)):
                if value is not None and not 0.0 <= value <= 1.0:
                    errors.append(f"--threshold: the {which} threshold must be in [0, 1] (scores and maps are "
                                  f"probabilities), got {value}")
        except ValueError as e:
            errors.append(str(e))
    out = getattr(args, "out", None)
    if out is not None:
        problem = output_problem(out, folder=True, flag="--out")
        if problem:
            errors.append(problem)
    target = getattr(args, "target_fpr", None)
    if target is not None and not (_finite(target) and 0.0 < target < 1.0):
        errors.append(f"--target_fpr must be a false-alarm rate in (0, 1), such as 0.01, got {target}")
    if getattr(args, "num_workers", 0) < 0:
        errors.append(f"--num_workers must be >= 0, got {args.num_workers}")
    try:
        args.device = single_device(args.device)
    except DeviceError as e:
        errors.append(str(e))
    else:
        if args.precision == "fp16" and not args.device.startswith("cuda"):
            errors.append("--precision fp16 needs a GPU (--device cuda); use bf16 or fp32 on the CPU")
    return errors


def input_problems(args: argparse.Namespace) -> list[str]:
    """One message per input that does not exist: ``predict``'s files and folders (globs are expanded
    later), ``calibrate``'s ``--normal`` / ``--labelled`` folders."""
    import glob
    from pathlib import Path

    errors = []
    for item in getattr(args, "inputs", None) or []:
        if not glob.has_magic(str(item)) and not Path(item).expanduser().exists():
            errors.append(f"no such file or folder: {item}")
    for flag in ("normal", "labelled"):
        for folder in getattr(args, flag, None) or []:
            if not Path(folder).expanduser().exists():
                errors.append(f"--{flag} {folder}: no such file or folder")
    return errors


def settle_model(args: argparse.Namespace, context: str = "inspect"
                 ) -> tuple[Mapping[str, Any], CheckpointInfo, list[str]]:
    """Read the checkpoint (once) and fill the model settings of ``args`` (flags, else the checkpoint's,
    else the ``context`` defaults); check them, the layers against the tower and the weights files.

    Returns the checkpoint's prompt-learner state dict (for :func:`crane.detector.build_detector`), its
    :class:`~crane.checkpoints.CheckpointInfo` and warning lines. Raises :class:`~crane.errors.CraneError`
    with one line per problem found (all of them), before any model work.
    """
    from crane.models.prompts import prompt_shape_problem
    from crane.models.weights import clip_depth, text_width_of, weights_problems

    explicit = explicit_flags(args)
    state, info = read_checkpoint(args.checkpoint)
    notes = apply_settings(args, explicit, info, bool(getattr(args, "force", False)))
    fill_settings(args, context)
    problems = settings.problems(args, context)
    weights = weights_problems(args.clip_weights, args.dino_model, args.dino_weights, args.clip_model)
    if not problems and not weights:
        given = "--features_list" if "features_list" in explicit else f"the {info.source}'s layers"
        problems += settings.layer_problems(args.features_list, clip_depth(str(args.clip_weights), args.clip_model),
                                            f"{args.clip_model} {args.clip_weights}", given)
    problems += weights
    shape = prompt_shape_problem(state, args.n_ctx, args.t_n_ctx, args.depth,
                                 text_width_of(args.clip_model, args.clip_weights),
                                 info.settings.get("clip_model")) if not problems else None
    problems += [f"{args.checkpoint}: {shape}"] if shape else []
    if problems:
        raise CraneError("\n".join(problems))
    return state, info, notes


def describe_model(args: argparse.Namespace, info: CheckpointInfo) -> str:
    """One line naming the model a run uses and where its settings come from."""
    kind = "Crane" if args.dino_model == "none" else f"Crane+ (D-Attn {args.dino_model})"
    layers = " ".join(map(str, args.features_list))
    origin = f"the {info.source}" if info.settings else \
        f"the defaults (checkpoint {info.path} records no settings)"
    return (f"{kind}, layers {layers}, soft_mean {args.soft_mean}, S {args.image_size}, CLIP {args.clip_model} "
            f"{args.clip_weights}; "
            f"settings not given as flags from {origin}")
