"""``python -m crane export``: the model of a checkpoint as one ONNX or OpenVINO graph.

Model settings come from the flags given, from the checkpoint (the ``"crane"`` entry
of our checkpoints, or the published settings of an official one, recognised by
SHA-256: :func:`crane.checkpoints.read_checkpoint`) and from the defaults of
``predict`` (the published Crane+ evaluation); as in ``test.py``, a flag that
contradicts the checkpoint stops the export unless ``--force``. The thresholds come from
``thresholds.json`` beside the checkpoint (or ``--thresholds FILE``) when there is one.

Few-shot: ``--reference FILE|DIR`` puts a reference memory into the graph as constants (a
``reference.pt``, refused in one line when built for other patch features, or normal images to
build one from with ``--coreset_ratio`` / ``--few_shot_weight``). Thresholds and memory must fit
each other: a ``thresholds.json`` whose ``"reference"`` entry (``{"path", "identity"}``, written by
``calibrate --reference_memory``) names a memory is exported with that memory (without ``--reference``,
one line says so) and refused with another; zero-shot thresholds are refused with ``--thresholds`` and
left out (one line) when found beside the checkpoint. A memory over ``--max_reference_mb`` is refused in
one line naming the coreset ratio that fits, before the memory is built and before the export.

Importing this module is cheap (no torch), so ``python -m crane --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from crane import settings
from crane.cli.args import add_reference_flags
from crane.cli.common import add_model_flags, checkpoint_of, settle
from crane.errors import CraneError
from crane.files import file_identity, output_problem

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
                    "and crane.deploy read them from there. With --reference (few-shot) a reference memory of normal "
                    "images goes into the graph as constants, and its record into the metadata.")
    e.add_argument("--out", required=True, type=Path, metavar="PATH",
                   help="file to write: .onnx (ONNX), .xml (OpenVINO IR, with a .bin beside it)")
    e.add_argument("--format", choices=FORMATS, help="onnx or openvino (default: from the suffix of --out)")
    e.add_argument("--fp16", action="store_true",
                   help="half-precision weights and arithmetic (for GPUs; inputs and outputs stay float32)")
    e.add_argument("--thresholds", type=Path, metavar="FILE",
                   help="thresholds.json to embed (default: the one beside --checkpoint, when present)")
    e.add_argument("--no_check", action="store_true",
                   help="do not run the written file once against the torch model")
    r = e.add_argument_group("few-shot (a reference memory of normal images inside the graph, docs/method.md)")
    r.add_argument("--reference", nargs="+", type=Path, metavar="FILE|DIR",
                   help="a reference.pt (calibrate --reference_memory, crane.reference.save_reference), or folders / "
                        "files of normal images to build the memory from (only those under good/ folders when a "
                        "folder has any); default: the memory the thresholds.json names, if any")
    add_reference_flags(r, defaults_in_help=True)
    r.add_argument("--max_reference_mb", type=float, default=1024.0, metavar="MB",
                   help="largest memory put into the graph, MiB of float32 constants (default: 1024); a larger one "
                        "is refused, naming the --coreset_ratio that fits")
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


def _choose_reference(args: argparse.Namespace, thresholds) -> tuple[Optional[list[Path]], Any]:
    """The memory to export (``--reference`` paths, or the one the thresholds name) and the thresholds that fit
    it (``None``: none embedded), before any model work. One-line :class:`CraneError` when they do not fit."""
    from crane.inspection.reference_use import named_memory, reference_flag_problems

    given = args.reference
    problems = reference_flag_problems(given, args)
    if problems:
        raise CraneError("\n".join(problems))
    file = given is not None and len(given) == 1 and given[0].suffix == ".pt"
    named = None if thresholds is None else named_memory(thresholds)
    if given is None:
        if named is not None:
            print(f"few-shot: exporting the reference memory {named}, the one {thresholds.source} names",
                  file=sys.stderr)
            return [named], thresholds
        return None, thresholds
    if named is not None:
        if file and file_identity(given[0]) == file_identity(named):
            return given, thresholds
        raise CraneError(f"{thresholds.source} was calibrated with the reference memory {named}, not "
                         f"--reference {' '.join(map(str, given))}: its thresholds would not fit the graph's scores; "
                         f"leave --reference out to export {named}, or calibrate with this memory")
    if thresholds is not None:
        if args.thresholds is not None:
            raise CraneError(f"{thresholds.source} was calibrated zero-shot (without a reference memory): its "
                             "thresholds would not fit the few-shot scores of --reference; calibrate with the memory "
                             "(`python -m crane calibrate --normal DIR --reference_memory`) or leave --thresholds out")
        print(f"note: not embedding {thresholds.source}: it was calibrated zero-shot, and the graph's scores are "
              "few-shot", file=sys.stderr)
    return given, None


def _budget_error(what: str, nbytes: int, references: int, patches: int, widths: list[int], ratio: float,
                  budget_mb: float, rebuild: bool) -> Optional[str]:
    """The one-line refusal of a memory of ``nbytes`` over ``budget_mb`` MiB, naming the coreset ratio that fits
    (of ``references`` images of ``patches`` patches, banks of ``widths``); ``None`` when it fits."""
    from crane.export.writer import fitting_ratio

    budget = int(budget_mb * 2 ** 20)
    if nbytes <= budget:
        return None
    fits = fitting_ratio(references, patches, widths, budget)
    amount = f"{nbytes / 2 ** 20:,.1f} MiB" if nbytes >= 2 ** 17 else f"{nbytes:,} bytes"
    size = (f"{what} is {amount} of float32 constants ({references} images x {patches} patches, "
            f"{len(widths)} bank{'s' if len(widths) > 1 else ''}, coreset ratio {ratio:g}), over --max_reference_mb "
            f"{budget_mb:g}")
    if fits is None:
        return f"{size}, and no coreset keeps it under that: raise --max_reference_mb"
    how = "build it again from the images with" if rebuild else "export with"
    return f"{size}: {how} --coreset_ratio {fits:g} (or raise --max_reference_mb)"


def _file_memory_error(path: Path, budget_mb: float) -> Optional[str]:
    """:func:`_budget_error` of a ``reference.pt``, read memory-mapped without a model
    (:func:`crane.reference.read_reference_file`, which refuses a file that is not a memory in one line)."""
    from crane.reference import read_reference_file

    content = read_reference_file(path, mmap=True)
    widths = [int(b["features"].shape[1]) for b in content["banks"]]
    nbytes = sum(b["features"].numel() * 4 for b in content["banks"])
    spec = content["spec"]
    references, patches = len(spec["digests"]), int(spec["patches_per_image"])
    return _budget_error(f"the reference memory {path}", nbytes, references, patches, widths,
                         float(spec["coreset_ratio"]), budget_mb, rebuild=True)


def _reference_images(paths: list[Path]) -> list[Path]:
    """The normal images of ``--reference`` folders and files (:func:`crane.inspection.reference_use.reference_images`:
    as ``calibrate --normal`` reads them), its notes printed."""
    from crane.inspection.reference_use import reference_images

    images, notes = reference_images(paths)
    for note in notes:
        print(note, file=sys.stderr)
    if not images:
        raise CraneError(f"--reference {' '.join(map(str, paths))}: no normal images (only defect folders)")
    return images


def _load_memory(detector, file: Optional[Path], images: list[Path], args: argparse.Namespace) -> None:
    """Give ``detector`` the memory of the ``reference.pt`` ``file``, or one built from ``images`` on the fly after
    its size, measured on the first image, was checked against ``--max_reference_mb``."""
    from crane.data.image import load_rgb, preprocess
    from crane.export.writer import reference_bytes
    from crane.models.memory import distinct_sets, memory_queries

    if file is not None:
        detector.set_reference(str(file))
        return
    first = preprocess(load_rgb(images[0], exif_orientation=True), detector.config.image_size)
    features = detector.encode(first[None])
    banks = memory_queries(features, distinct_sets(features), features.vfm_features is not None)
    widths, patches = [int(b.shape[-1]) for b in banks], int(banks[0].shape[1])
    problem = _budget_error("the reference memory", reference_bytes(len(images), patches, widths, args.coreset_ratio),
                            len(images), patches, widths, args.coreset_ratio, args.max_reference_mb, rebuild=False)
    if problem:
        raise CraneError(problem)
    detector.set_reference(images, args.coreset_ratio, args.few_shot_weight, progress=True, exif_orientation=True)


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
    if not args.max_reference_mb > 0:
        raise CraneError(f"--max_reference_mb must be a positive number of MiB, got {args.max_reference_mb:g}")
    checkpoint = Path(checkpoint_of(args)).expanduser()
    state, info = settle(args)
    reference, thresholds = _choose_reference(args, _thresholds(args, checkpoint))
    memory_file = reference[0] if reference is not None and reference[0].suffix == ".pt" else None
    images = _reference_images(reference) if reference is not None and memory_file is None else []
    problem = None if memory_file is None else _file_memory_error(memory_file, args.max_reference_mb)
    if problem:
        raise CraneError(problem)
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
    detector = build_detector(args, state)
    if reference is not None:
        _load_memory(detector, memory_file, images, args)
    graph = InferenceGraph.from_detector(detector)
    info = default_info(graph, str(checkpoint), info.sha256, model_options,
                        None if thresholds is None else {**thresholds.to_json(), "source": thresholds.source},
                        args.fp16, memory_file)
    if info.reference is not None:
        print(f"the graph holds {info.reference_summary()}", file=sys.stderr)
    files = export_graph(graph, args.out, fmt, info, args.fp16)
    if not args.no_check:
        _check(graph, files, fmt, args.fp16)
    size = sum(f.stat().st_size for f in files) / 1e6
    kept = "no thresholds" if thresholds is None else \
        f"thresholds image={thresholds.image!r}, pixel={thresholds.pixel!r} from {thresholds.source}"
    if info.reference is not None:
        kept += f"; a reference memory of {info.reference['references']} images"
    print(f"wrote {', '.join(map(str, files))} ({size:.1f} MB; {fmt}, {info.precision}, S={info.image_size}, {kept})")
    return 0
