"""What ``predict`` and ``calibrate`` settle before any model work.

* :func:`flag_errors`: one message per unusable flag value (sizes, rates, device, precision);
* :func:`settle_model`: the model settings, from the checkpoint unless a flag sets them
  (:func:`crane.checkpoints.apply_settings`: a flag that contradicts the checkpoint stops
  the run unless ``--force``), then the layers against the CLIP tower and the weights files;
* :func:`model_record` and :func:`threshold_differences`: what ``thresholds.json`` records
  about the model it was calibrated with, and how a run differs from it.

Everything here raises ``ValueError`` subclasses (or returns messages) with one line each,
so the command line reports them with exit code 2 within seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

from crane.checkpoints import MODEL_SETTING_KEYS, CheckpointInfo, apply_settings, flag_value, read_checkpoint
from crane.cli_args import explicit_flags

# Defaults of the model flags: the published Crane+ evaluation settings (as test.py).
MODEL_DEFAULTS = argparse.Namespace(features_list=[24], dino_model="dinov2", soft_mean=False, image_size=518,
                                    sigma=4.0, attn_type="qq+kk+vv", both_eattn_dattn=True,
                                    use_scorebase_pooling=True, dattn_batch_mean=False)
# Model options recorded in thresholds.json and compared when predict uses the file.
MODEL_OPTIONS = ("clip_weights", "dino_model", "features_list", "soft_mean", "image_size", "sigma", "attn_type",
                 "both_eattn_dattn", "use_scorebase_pooling", "dattn_batch_mean")
MIN_IMAGE_SIZE = 14
"""One ViT patch: the smallest model input."""
CLIP_DEPTH = 24
"""Blocks of the vision tower that ``--clip_weights openai`` and ``synthetic`` build."""
"""Blocks of the vision towers of ``--clip_weights openai`` and ``synthetic``."""


class SetupError(ValueError):
    """A flag, checkpoint or weights file is unusable for this run (one-line message)."""


def one_line(message: str) -> str:
    """A multi-line message (such as a weights hint with bullets) as one line."""
    lines = [line.strip().lstrip("*").strip() for line in str(message).strip().splitlines()]
    return " ".join(line for line in lines if line) or "error"


# ---------------------------------------------------------------------------------- flags


def resolve_device(name: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N``, ``N`` (= ``cuda:N``) or ``auto`` -> a torch device string
    (:func:`crane.engine.distributed.resolve_device`, one process). Raises :class:`SetupError`."""
    from crane.engine.distributed import DeviceError
    from crane.engine.distributed import resolve_device as resolve

    try:
        kind, devices = resolve(name)
    except DeviceError as e:
        raise SetupError(str(e)) from None
    explicit = str(name).strip().lower() not in ("auto", "cpu", "cuda")
    return f"cuda:{devices[0]}" if kind == "cuda" and explicit else kind


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def flag_errors(args: argparse.Namespace) -> list[str]:
    """One message per unusable flag value of ``predict`` / ``calibrate``; resolves ``args.device``."""
    from crane.thresholds import parse_override

    errors = []
    if args.batch_size < 1:
        errors.append(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.image_size < MIN_IMAGE_SIZE:
        errors.append(f"--image_size must be at least {MIN_IMAGE_SIZE} (one ViT patch), got {args.image_size}")
    if not _finite(args.sigma) or args.sigma < 0:
        errors.append(f"--sigma must be a finite number >= 0 (0: no smoothing), got {args.sigma}")
    if getattr(args, "threshold", None):
        try:
            for which, value in zip(("image", "pixel"), parse_override(args.threshold)):
                if value is not None and not 0.0 <= value <= 1.0:
                    errors.append(f"--threshold: the {which} threshold must be in [0, 1] (scores and maps are "
                                  f"probabilities), got {value}")
        except ValueError as e:
            errors.append(str(e))
    target = getattr(args, "target_fpr", None)
    if target is not None and not (_finite(target) and 0.0 < target < 1.0):
        errors.append(f"--target_fpr must be a false-alarm rate in (0, 1), such as 0.01, got {target}")
    if getattr(args, "num_workers", 0) < 0:
        errors.append(f"--num_workers must be >= 0, got {args.num_workers}")
    if any(int(f) < 1 for f in getattr(args, "features_list", [])):
        errors.append(f"--features_list counts CLIP blocks from 1, got {' '.join(map(str, args.features_list))}")
    try:
        args.device = resolve_device(args.device)
    except SetupError as e:
        errors.append(str(e))
    else:
        if args.precision == "fp16" and not args.device.startswith("cuda"):
            errors.append("--precision fp16 needs a GPU (--device cuda); use bf16 or fp32 on the CPU")
    return errors


# ---------------------------------------------------------------------------------- model


def _resblocks(keys) -> int:
    pattern = re.compile(r"^(?:module\.)?(?:state_dict\.|model\.)?visual\.transformer\.resblocks\.(\d+)\.")
    return len({m.group(1) for m in map(pattern.match, keys) if m})


def clip_depth(weights: str) -> Optional[int]:
    """Blocks of the CLIP vision tower ``weights`` names, read without loading tensors; ``None`` when
    that cannot be told cheaply (a TorchScript archive, a legacy pickle): the load checks it then."""
    if weights in ("openai", "synthetic"):
        return CLIP_DEPTH
    path = Path(weights).expanduser()
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                return _resblocks(json.loads(f.read(length)))
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            if any("/code/" in name for name in archive.namelist()):
                return None  # TorchScript (OpenAI's ViT-L-14-336px.pt)
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable here: building the model reports it
        return None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
        return _resblocks(state.keys()) or None
    return None


def _fill_defaults(args: argparse.Namespace) -> None:
    """The model settings not given on the command line: :data:`MODEL_DEFAULTS`, else the model's own."""
    import dataclasses

    from crane.models.crane import CraneConfig

    config = {f.name: f.default for f in dataclasses.fields(CraneConfig)}
    for key in MODEL_SETTING_KEYS:
        if not hasattr(args, key):
            value = getattr(MODEL_DEFAULTS, key, config.get(key))
            setattr(args, key, list(value) if isinstance(value, (list, tuple)) else value)


def settle_model(args: argparse.Namespace) -> tuple[CheckpointInfo, list[str]]:
    """Read the checkpoint and fill the model settings of ``args`` (flags, else the checkpoint's, else
    the defaults); check the layers against the tower and that the weights files exist.

    Returns the checkpoint's :class:`~crane.checkpoints.CheckpointInfo` and warning lines. Raises
    :class:`~crane.checkpoints.CheckpointError`, :class:`SetupError` or
    :class:`~crane.models.errors.WeightsNotFoundError` (all one line, before any model work).
    """
    explicit = explicit_flags(args)
    _, info = read_checkpoint(args.checkpoint)
    _fill_defaults(args)
    notes = apply_settings(args, explicit, info, bool(getattr(args, "force", False)))
    if not args.features_list:
        raise SetupError("--features_list needs at least one CLIP block")
    clip = str(args.clip_weights)
    if clip not in ("openai", "synthetic") and not Path(clip).expanduser().is_file():
        raise SetupError(f"CLIP weights file not found: {clip}; pass --clip_weights openai (the cached download), "
                         "a ViT-L-14-336px.pt file, or synthetic")
    depth = clip_depth(clip)
    bad = [int(f) for f in args.features_list if depth is not None and not 1 <= int(f) <= depth]
    if bad:
        given = "--features_list" if "features_list" in explicit else f"the {info.source}'s layers"
        raise SetupError(f"{given} {' '.join(map(str, bad))}: the CLIP vision tower ({clip}) has blocks 1 to {depth}")
    if clip == "openai":
        from crane.models.clip_loader import resolve_openai_weights

        resolve_openai_weights()
    if args.dino_model != "none":
        if args.dino_weights not in (None, "synthetic") and not Path(args.dino_weights).expanduser().is_file():
            raise SetupError(f"--dino_weights file not found: {args.dino_weights}")
        if args.dino_weights is None:
            from crane.models.vfm import resolve_vfm_weights

            resolve_vfm_weights(args.dino_model)
    return info, notes


def describe_model(args: argparse.Namespace, info: CheckpointInfo) -> str:
    """One line naming the model a run uses and where its settings come from."""
    kind = "Crane" if args.dino_model == "none" else f"Crane+ (D-Attn {args.dino_model})"
    layers = " ".join(map(str, args.features_list))
    origin = f"the {info.source}" if info.settings else \
        f"the defaults (checkpoint {info.path} records no settings)"
    return (f"{kind}, layers {layers}, soft_mean {args.soft_mean}, S {args.image_size}, CLIP {args.clip_weights}; "
            f"settings not given as flags from {origin}")


# ----------------------------------------------------------------------------- thresholds


def weights_tag(weights: Optional[str], default: str) -> str:
    """How ``thresholds.json`` identifies weights: ``openai`` / ``synthetic`` / the default cache, or a file
    by its size (a copy or a move keeps it; other weights of the same architecture are rare)."""
    if weights in (None, "openai"):
        return default
    if weights == "synthetic":
        return "synthetic"
    path = Path(weights).expanduser()
    return f"file of {path.stat().st_size} bytes" if path.is_file() else f"missing file {weights}"


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options that change scores (:data:`MODEL_OPTIONS`), as the flags give them."""
    options = {k: getattr(args, k, getattr(MODEL_DEFAULTS, k, None)) for k in MODEL_OPTIONS}
    options["features_list"] = [int(f) for f in options["features_list"]]
    return options


def model_record(args: argparse.Namespace, info: CheckpointInfo) -> dict[str, Any]:
    """The ``"model"`` entry of ``thresholds.json``: the checkpoint (path, SHA-256), the options and the
    weights, as :func:`threshold_differences` compares them."""
    record = {"checkpoint": str(args.checkpoint), "checkpoint_sha256": info.sha256,
              "checkpoint_source": info.source, **model_options(args), "dino_weights": args.dino_weights,
              "weights": {"clip": weights_tag(args.clip_weights, "openai"),
                          "dino": None if args.dino_model == "none" else weights_tag(args.dino_weights, "published")},
              "precision": args.precision}
    if args.dattn_batch_mean and args.dino_model != "none":
        record["batch_size"] = int(args.batch_size)  # the batch-wide D-Attn mean makes maps depend on it
    return record


def _same(a: Any, b: Any) -> bool:
    """Equal as settings: layer lists by value, booleans only to booleans, numbers as floats."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return [int(v) for v in a] == [int(v) for v in b]
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def threshold_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """How the run's :func:`model_record` ``current`` differs from the ``recorded`` one, one phrase per setting
    that changes the scores (the checkpoint by SHA-256; the weights by :func:`weights_tag`)."""
    if not isinstance(recorded, Mapping) or "checkpoint_sha256" not in recorded:
        return ["it records no model settings or checkpoint SHA-256 (made by an older crane, or by hand)"]
    out = []
    if recorded["checkpoint_sha256"] != current["checkpoint_sha256"]:
        out.append(f"checkpoint SHA-256 {str(recorded['checkpoint_sha256'])[:12]} ({recorded.get('checkpoint')}), "
                   f"this run {current['checkpoint_sha256'][:12]} ({current['checkpoint']})")
    for key in [k for k in MODEL_OPTIONS if k != "clip_weights"]:
        if key not in recorded:
            out.append(f"it records no --{key}")
        elif not _same(recorded[key], current[key]):
            out.append(f"{flag_value(key, recorded[key])}, this run {flag_value(key, current[key])}")
    if "batch_size" in recorded and "batch_size" in current and recorded["batch_size"] != current["batch_size"]:
        out.append(f"--batch_size {recorded['batch_size']} with the batch-wide D-Attn mean, this run "
                   f"--batch_size {current['batch_size']}")
    weights = recorded.get("weights") if isinstance(recorded.get("weights"), Mapping) else {}
    for kind, flag in (("clip", "clip_weights"), ("dino", "dino_weights")):
        if weights.get(kind) != current["weights"][kind] and current["weights"][kind] is not None:
            out.append(f"--{flag} {recorded.get(flag)} ({weights.get(kind)}), this run "
                       f"{current.get(flag)} ({current['weights'][kind]})")
    return out
