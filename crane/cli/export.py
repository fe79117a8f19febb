"""``python -m crane export``: the model of a checkpoint as one ONNX or OpenVINO graph.

Model settings come from the flags given, from the checkpoint (the ``"crane"`` entry
of our checkpoints, or the published settings of an official one, recognised by
SHA-256: :func:`crane.checkpoints.read_checkpoint`) and from the defaults of
``predict`` (the published Crane+ evaluation); as in ``test.py``, a flag that
contradicts the checkpoint stops the export unless ``--force``. The thresholds come from
``thresholds.json`` beside the checkpoint (or ``--thresholds FILE``) when there is one.

Importing this module is cheap (no torch), so ``python -m crane --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from crane import settings
from crane.cli.common import add_model_flags, checkpoint_of, settle
from crane.errors import CraneError
from crane.files import output_problem

FORMATS = ("onnx", "openvino")
SUFFIXES = {".onnx": "onnx", ".xml": "openvino"}
CHECK_TOLERANCE = 1e-4  # fp32 graph against torch on one image, scores and maps


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``export`` subcommand."""
    e = sub.add_parser(
        "export", help="export the model as one ONNX or OpenVINO graph (images -> scores, maps)",
        description="Export one graph from a preprocessed batch B x 3 x S x S (float32, dynamic B) to the image "
                    "scores (B) and the smoothed anomaly maps (B x S x S): E-Attn, D-Attn with its VFM (Crane+), the "
                    "text features as constants, score pooling, upsampling and Gaussian smoothing. The model "
                    "settings, S, the checkpoint's SHA-256 and the thresholds (thresholds.json beside the "
                    "checkpoint) go into the file's metadata; `predict --backend onnxruntime|openvino --model PATH` "
                    "and crane.deploy read them from there.")
    e.add_argument("--out", required=True, type=Path, metavar="PATH",
                   help="file to write: .onnx (ONNX), .xml (OpenVINO IR, with a .bin beside it)")
    e.add_argument("--format", choices=FORMATS, help="onnx or openvino (default: from the suffix of --out)")
    e.add_argument("--fp16", action="store_true",
                   help="half-precision weights and arithmetic (for GPUs; inputs and outputs stay float32)")
    e.add_argument("--thresholds", type=Path, metavar="FILE",
                   help="thresholds.json to embed (default: the one beside --checkpoint, when present)")
    e.add_argument("--no_check", action="store_true",
                   help="do not run the written file once against the torch model")
    add_model_flags(e, run_flags=False)


def _format(args: argparse.Namespace) -> str:
    by_suffix = SUFFIXES.get(args.out.suffix.lower())
    fmt = args.format or by_suffix
    if fmt is None:
        raise CraneError(f"--out {args.out}: use a .onnx or .xml file name, or pass --format onnx|openvino")
    if by_suffix != fmt:
        wanted = next(s for s, f in SUFFIXES.items() if f == fmt)
        raise CraneError(f"--format {fmt} writes a {wanted} file, but --out is {args.out}")
    return fmt


def _thresholds(args: argparse.Namespace, checkpoint: Path):
    from crane.inspection.thresholds import default_path, load_thresholds

    path = args.thresholds or default_path(checkpoint)
    if args.thresholds is None and not path.is_file():
        return None
    return load_thresholds(path)


def _check(graph, files: list[Path], fmt: str, fp16: bool) -> None:
    """Run the written graph on one image against the torch module; print the differences."""
    import numpy as np
    import torch

    from crane.deploy.image import preprocess
    from crane.deploy.runtime import DeployedModel

    size = graph.image_size
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = (np.stack([np.sin(7 * xx), np.cos(5 * yy), np.sin(3 * (xx + yy))], -1) * 127 + 128).astype(np.uint8)
    batch = preprocess(image, size)[None]
    with torch.no_grad():
        scores, maps = (t.numpy() for t in graph(torch.from_numpy(batch)))
    path = next(f for f in files if f.suffix in (".onnx", ".xml"))
    got_scores, got_maps = DeployedModel(path, "onnxruntime" if fmt == "onnx" else "openvino", "cpu").run(batch)
    d_score, d_map = float(np.abs(got_scores - scores).max()), float(np.abs(got_maps - maps).max())
    print(f"check against torch on one image: max |score diff| {d_score:.2e}, max |map diff| {d_map:.2e}",
          file=sys.stderr)
    if not fp16 and max(d_score, d_map) > CHECK_TOLERANCE:
        print(f"warning: the exported graph differs from the torch model by more than {CHECK_TOLERANCE:g}",
              file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """``python -m crane export``."""
    fmt = _format(args)
    problem = output_problem(args.out, flag="--out")
    if problem:
        raise CraneError(problem)
    checkpoint = Path(checkpoint_of(args)).expanduser()
    state, info = settle(args)
    thresholds = _thresholds(args, checkpoint)
    model_options = settings.recorded(args, "thresholds")
    if thresholds is not None:
        calibrated = thresholds.meta.get("model", {})
        differ = [f"{k}={calibrated[k]!r} (export: {v!r})" for k, v in model_options.items()
                  if k in calibrated and calibrated[k] != v]
        if differ:
            print(f"warning: {thresholds.source} was calibrated with other model options: {', '.join(differ)}",
                  file=sys.stderr)

    from crane.detector import build_detector
    from crane.export.graph import InferenceGraph
    from crane.export.writer import default_info, export_graph

    args.device = "cpu"
    print(f"model: {', '.join(f'{k}={v!r}' for k, v in model_options.items())} (from {info.source} where no flag "
          "gives them)", file=sys.stderr)
    graph = InferenceGraph.from_detector(build_detector(args, state))
    info = default_info(graph, str(checkpoint), info.sha256, model_options,
                        None if thresholds is None else {**thresholds.to_json(), "source": thresholds.source},
                        args.fp16)
    files = export_graph(graph, args.out, fmt, info, args.fp16)
    if not args.no_check:
        _check(graph, files, fmt, args.fp16)
    size = sum(f.stat().st_size for f in files) / 1e6
    kept = "no thresholds" if thresholds is None else \
        f"thresholds image={thresholds.image!r}, pixel={thresholds.pixel!r} from {thresholds.source}"
    print(f"wrote {', '.join(map(str, files))} ({size:.1f} MB; {fmt}, {info.precision}, S={info.image_size}, {kept})")
    return 0
