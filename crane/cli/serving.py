"""``python -m crane predict --backend onnxruntime|openvino --model PATH``: the exported graph behind predict.

The model settings, ``S`` and the thresholds come from the file's metadata; model flags
that contradict them are refused (the graph is fixed at export). No torch is imported.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from crane import settings
from crane.cli.args import explicit_flags, fill_settings
from crane.deploy.image import ImageReadError
from crane.deploy.runtime import DeployedModel
from crane.errors import CraneError

EXPORT_SUFFIXES = (".onnx", ".xml")


class DeployPredictor:
    """What ``predict`` needs from a model, for an exported graph (see ``crane.cli.predict.TorchPredictor``)."""

    read_error = ImageReadError

    def __init__(self, model: DeployedModel) -> None:
        self.model = model
        self.image_size = model.image_size

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        return self.model.preprocess(rgb)

    def predict(self, batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed images -> (scores ``B``, smoothed maps ``B x S x S``)."""
        return self.model.run(np.stack(batch))

    def thresholds(self):
        """The thresholds the export embedded (a :class:`crane.inspection.thresholds.Thresholds`, maybe empty)."""
        from crane.inspection.thresholds import Thresholds

        saved = self.model.info.thresholds
        if saved is None:
            return Thresholds(source=str(self.model.path))
        meta = {k: v for k, v in saved.items() if k not in ("format", "rule", "image_threshold", "pixel_threshold")}
        origin = saved.get("source")
        return Thresholds(saved.get("image_threshold"), saved.get("pixel_threshold"), meta,
                          f"{self.model.path}" + (f" (thresholds from {origin})" if origin else ""))


def open_predictor(args: argparse.Namespace) -> DeployPredictor:
    """Open ``args.model`` for ``predict``; refuse every setting typed on the command line that the exported
    graph does not have, whatever its value (the graph is fixed at export). On return the settings in ``args``
    are the graph's (so threshold checks compare like with like). Raises :class:`~crane.errors.CraneError`."""
    flag = f"--backend {args.backend}"
    if not args.model:
        raise CraneError(f"{flag} needs --model PATH (a file written by `python -m crane export`)")
    if not os.path.isfile(args.model):
        raise CraneError(f"exported model not found: {args.model}")
    if os.path.splitext(args.model)[1].lower() not in EXPORT_SUFFIXES:
        raise CraneError(f"{args.model} is not an exported model: {flag} runs a .onnx or OpenVINO .xml file written "
                         "by `python -m crane export`; a .pth checkpoint runs with --backend torch --checkpoint FILE")
    if args.checkpoint is not None:
        raise CraneError("--checkpoint is for --backend torch: the exported model carries its own checkpoint")
    if args.precision != "fp32":
        raise CraneError(f"--precision is for --backend torch: an exported graph runs in the precision it was "
                         "exported with (`python -m crane export --fp16` for half precision)")
    print(f"loading the exported model ({args.model}, {args.backend}) ...", file=sys.stderr)
    model = DeployedModel(args.model, args.backend, args.device)
    memory = model.info.reference_summary()
    if memory is not None:
        print(f"few-shot: the graph holds {memory}; its scores mix zero-shot and few-shot", file=sys.stderr)
    exported = model.info.model
    typed = explicit_flags(args)
    conflicts = [f"--{k} {getattr(args, k)!r} (exported: {exported.get(k)!r})" for k in settings.names()
                 if k in typed and (k not in exported or not settings.same(getattr(args, k), exported[k]))]
    if conflicts:
        raise CraneError(f"{args.model} was exported with other model settings: {', '.join(conflicts)}; drop these "
                         "flags or export again with them")
    banner = settings.random_weights_banner(exported)
    if banner:
        print(f"warning: {args.model} was exported with {banner}", file=sys.stderr)
    for key, value in exported.items():
        setattr(args, key, value)
    fill_settings(args, "inspect")
    args.checkpoint = model.info.checkpoint
    return DeployPredictor(model)


def thresholds_note(thresholds, predictor: DeployPredictor, force: bool) -> str:
    """Which thresholds a run of the exported graph uses, as one line. A ``thresholds.json`` beside the
    graph (or ``--thresholds FILE``) is preferred to the thresholds in the graph's metadata; one that records
    another checkpoint or other model options than the graph's is refused unless ``force``."""
    from crane.inspection.thresholds import default_path

    embedded, info, path = predictor.thresholds(), predictor.model.info, predictor.model.path
    if thresholds.source == embedded.source:
        if info.thresholds is None:
            return f"thresholds: none (no thresholds.json beside {path}, none in its metadata)"
        return f"thresholds: from the metadata of {path} (no thresholds.json beside it)"
    from crane.inspection.reference_use import deployed_problem

    problem = deployed_problem(thresholds, getattr(info, "reference", None))
    if problem and not force:
        raise CraneError(f"{problem}; or pass --force")
    if problem:
        print(f"warning: {problem} (--force: using the thresholds anyway; decisions may be wrong)", file=sys.stderr)
    recorded = thresholds.meta.get("model") if isinstance(thresholds.meta.get("model"), dict) else {}
    differ = [f"{key} {recorded[key]!r}, the graph's {value!r}" for key, value in
              [("checkpoint_sha256", info.checkpoint_sha256), *info.model.items()]
              if key not in ("clip_weights", "dino_weights") and key in recorded and recorded[key] != value]
    if differ:
        message = f"{thresholds.source} was calibrated for other scores than {path} gives: {'; '.join(differ)}"
        if not force:
            raise CraneError(f"{message}; calibrate again on this graph, or pass --force")
        print(f"warning: {message} (--force: using it anyway; decisions may be wrong)", file=sys.stderr)
    if Path(thresholds.source) != default_path(path):
        return f"thresholds: from {thresholds.source}"
    instead = ", instead of the thresholds in its metadata" if info.thresholds is not None else ""
    return f"thresholds: from {thresholds.source} (beside the exported model{instead})"
