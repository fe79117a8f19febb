"""``python -m crane predict INPUT... --out DIR``: score image files, folders (searched recursively) and
globs; write ``DIR/scores.csv`` and one panel per image. ``--backend onnxruntime|openvino --model PATH``
runs a graph written by ``python -m crane export`` (:mod:`crane.cli.serving`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from crane.checkpoints import CheckpointInfo
from crane.cli.args import add_bool_flag, add_reference_flags
from crane.cli import common
from crane.cli.common import EXIT_SKIPPED, add_bit_depth_flag, add_model_flags
from crane.data.folders import IMAGE_SUFFIXES, InputFile, collect_inputs
from crane.errors import EXIT_INTERRUPTED, CraneError
from crane.inspection.thresholds import Thresholds, default_path, load_thresholds, model_record, parse_override, \
    threshold_differences


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``predict`` subcommand."""
    p = sub.add_parser("predict", help="score images and draw anomaly panels",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score images, folders (recursive) and globs; write DIR/scores.csv (path, score, "
                                   "decision) and DIR/panels/NAME.png (original | heat map | overlay).",
                       epilog="Thresholds: thresholds.json beside the checkpoint (from `python -m crane calibrate`) "
                              "gives `decision` (anomalous when score >= image threshold) and the outlined region "
                              "(map >= pixel threshold); it must have been calibrated with this checkpoint and "
                              "these model settings. --thresholds FILE reads another file; --threshold overrides "
                              "it: IMG, IMG,PIX or ,PIX.\nWithout thresholds `decision` is empty and nothing is "
                              "outlined.\nImages are turned as their EXIF orientation says (as photo viewers show "
                              "them). Ground-truth masks (*_mask.*, files under masks/ or ground_truth/) found in "
                              "folders and globs are left out unless --include_masks.\nOutput names: NAME is the "
                              "image's path below the deepest folder common to the inputs, a .png suffix dropped and "
                              "any other kept (photos/a/x.png -> panels/a/x.png, photos/a/y.jpg -> panels/a/y.jpg.png); "
                              "maps/NAME.npy and masks/NAME.png likewise.\nAn --out folder holding an "
                              "earlier run's files is cleaned of them first.\nExit status: 0 ok, 1 error, 2 unusable "
                              "input, 3 some files were unreadable and skipped, 130 interrupted.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=f"image file, folder (searched recursively for {' '.join(IMAGE_SUFFIXES)}, any case) or "
                        "quoted glob such as 'photos/**/*.jpg'")
    p.add_argument("--out", "--save_path", dest="out", required=True, type=Path, metavar="DIR",
                   help="output folder (created)")
    p.add_argument("--thresholds", type=Path, metavar="FILE",
                   help="thresholds.json to use (default: the one beside --checkpoint, when present)")
    p.add_argument("--threshold", metavar="IMG[,PIX]",
                   help="override the image threshold, and the pixel one after a comma (',PIX' for pixel only); "
                        "values in [0, 1]")
    add_bool_flag(p, "--save_maps", False, "also write DIR/maps/NAME.npy (S x S float32 map)", True)
    add_bool_flag(p, "--save_masks", False, "also write DIR/masks/NAME.png (0/255 at the image's size; needs a "
                                            "pixel threshold)", True)
    add_bool_flag(p, "--no_panels", False, "skip the panels (scores only)", True)
    add_bool_flag(p, "--include_masks", False, "also score ground-truth mask files found in folders and globs", True)
    p.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"), default="torch",
                   help="torch: build the model from --checkpoint and the model flags; onnxruntime / openvino: run "
                        "the graph --model written by `python -m crane export` (settings, size and thresholds from "
                        "its metadata) (default: torch)")
    p.add_argument("--model", metavar="PATH", help="exported graph (.onnx, or OpenVINO .xml) for --backend")
    r = p.add_argument_group("few-shot (docs/method.md, Few-shot)")
    r.add_argument("--reference", nargs="+", type=Path, metavar="PATH",
                   help="score with a reference memory of normal images: a reference.pt (from `python -m crane "
                        "calibrate --reference_memory`), or folders/files of normal images to build one from (only "
                        "those under good/ folders when a folder has any). Without it, predict uses the memory the "
                        "thresholds file names, if any (its first output line says so). Thresholds calibrated with "
                        "another memory, or zero-shot, are refused unless --threshold IMG,PIX or --force")
    add_reference_flags(r, True)
    add_bit_depth_flag(p)
    add_model_flags(p)



class TorchPredictor:
    """``predict``'s torch backend: :meth:`Detector.predict_tensor` with the smoothing on the device, as
    test.py. ``crane.cli.serving.DeployPredictor`` is the same interface for exported graphs."""

    def __init__(self, args: argparse.Namespace, state: Mapping[str, Any], info: CheckpointInfo,
                 reference=None) -> None:
        from crane.data.image import ImageReadError

        self.detector = common.load_detector(args, state, info)
        self.image_size = self.detector.config.image_size
        self.read_error = ImageReadError
        self.memory = use_reference(self.detector, reference, args)


    def preprocess(self, rgb):
        from crane.data.image import preprocess

        return preprocess(rgb, self.image_size)

    def predict(self, batch: list):
        """Preprocessed images -> (scores ``B``, smoothed maps ``B x S x S``), numpy float32."""
        import torch

        scores, maps = self.detector.predict_tensor(torch.stack(batch), smooth=True)
        return scores.numpy(), maps.numpy()




def use_reference(detector, choice, args: argparse.Namespace):
    """Give ``detector`` the memory of ``choice`` (a :class:`crane.inspection.reference_use.ReferenceChoice`;
    ``None``: zero-shot): a ``reference.pt`` is loaded (refused in one line when built with other settings),
    images are built into one with ``--coreset_ratio`` / ``--few_shot_weight``, read as predict reads images.
    Returns the memory (``None``: zero-shot)."""
    if choice is None:
        return detector.set_reference(None)
    if choice.file is not None:
        return detector.set_reference(choice.file)
    return detector.set_reference(choice.images, args.coreset_ratio, args.few_shot_weight, progress=True,
                                  exif_orientation=True, bit_depth=args.bit_depth)


def choose_reference(args: argparse.Namespace, thresholds: Thresholds):
    """The memory ``predict`` (and the app) score with, checked before any model work
    (:func:`crane.inspection.reference_use.choose_reference`); its warnings go to stderr. An exported graph
    (``--backend onnxruntime|openvino``) holds its memory in the graph: ``--reference`` is refused, and so are
    thresholds calibrated with a memory the graph does not hold."""
    from crane.inspection import reference_use

    problems = reference_use.reference_flag_problems(getattr(args, "reference", None), args)
    if problems:
        raise CraneError(problems[0])
    if args.backend != "torch":
        if getattr(args, "reference", None):
            raise CraneError(f"--reference is for --backend torch: an exported graph scores with the memory exported "
                             "into it (`python -m crane export --reference ...`)")
        return None
    choice, notes = reference_use.choose_reference(getattr(args, "reference", None), thresholds,
                                                   _file_values_used(thresholds, args), args.force)
    for note in notes:
        print(note, file=sys.stderr)
    return choice


def resolve_thresholds(args: argparse.Namespace, embedded: Optional[Thresholds] = None) -> Thresholds:
    """Thresholds from ``--thresholds``, else the file beside the checkpoint (beside the exported model
    ``--model`` when ``embedded``, its metadata's thresholds, are given), else ``embedded``, then
    ``--threshold`` overrides."""
    path = args.thresholds or default_path(args.checkpoint if embedded is None else args.model)
    try:
        if args.thresholds is not None or path.is_file():
            thresholds = load_thresholds(path)
        else:
            thresholds = embedded or Thresholds()
    except (OSError, ValueError) as e:
        raise CraneError(str(e)) from None
    if args.threshold:
        image, pixel = parse_override(args.threshold)
        thresholds.image = thresholds.image if image is None else image
        thresholds.pixel = thresholds.pixel if pixel is None else pixel
    return thresholds


def _file_values_used(thresholds: Thresholds, args: argparse.Namespace) -> bool:
    """Whether a value of the thresholds file is used (``--threshold`` may override both)."""
    if thresholds.source is None:
        return False
    image, pixel = parse_override(args.threshold) if args.threshold else (None, None)
    return image is None or pixel is None


def threshold_notes(thresholds: Thresholds, args: argparse.Namespace, info: Optional[CheckpointInfo]) -> list[str]:
    """One-line notes on missing thresholds; a file calibrated with another checkpoint or other model
    settings is refused (:class:`CraneError`), or with ``--force`` gives a warning. ``info`` is ``None``
    for an exported model, whose embedded thresholds were checked when it was exported."""
    notes = []
    calibrate = (f"python -m crane calibrate --normal DIR --target_fpr 0.01 --checkpoint {args.checkpoint} "
                 "[same model flags]")
    if thresholds.image is None and thresholds.pixel is None:
        where = f"{thresholds.source} has none" if thresholds.source else f"{default_path(args.checkpoint)} not found"
        notes.append(f"note: no thresholds ({where}), so `decision` is left empty and the panels outline nothing; "
                     f"calibrate on normal images with `{calibrate}`, or pass --threshold IMG[,PIX]")
    elif thresholds.image is None:
        notes.append(f"note: no image threshold in {thresholds.source}, so `decision` is left empty; "
                     "pass --threshold IMG")
    elif thresholds.pixel is None:
        notes.append("note: no pixel threshold, so the panels outline nothing; calibrate with --target_fpr or on "
                     "images with masks, or pass --threshold IMG,PIX")
    calibrated = (thresholds.meta.get("calibration") or {}).get("bit_depth")
    if calibrated is not None and calibrated != args.bit_depth and _file_values_used(thresholds, args):
        notes.append(f"warning: {thresholds.source} was calibrated on images read with --bit_depth {calibrated}, "
                     f"this run reads them with --bit_depth {args.bit_depth}: pass --bit_depth {calibrated}")
    if info is not None and _file_values_used(thresholds, args):
        differ = threshold_differences(thresholds.meta.get("model"),
                                       model_record(args, info))
        if differ:
            message = (f"{thresholds.source} was calibrated for other scores: {'; '.join(differ)}")
            if not args.force:
                raise CraneError(f"{message}; calibrate again for this run, use the calibrated settings, or pass "
                               "--force")
            notes.append(f"warning: {message} (--force: using it anyway; decisions may be wrong)")
    return notes




def load_input(item: InputFile, predictor, bit_depth: int = 16, notes=None):
    """``(rgb, preprocessed)`` of one file (as photo viewers show it: EXIF orientation applied), or
    ``(None, reason)`` when it cannot be read; what was done to an unusual file is counted in ``notes``
    (:class:`crane.data.image.InputNotes`; a fresh one when not given)."""
    from crane.data.image import InputNotes, load_rgb

    notes = InputNotes() if notes is None else notes
    try:
        rgb = load_rgb(item.path, exif_orientation=True, bit_depth=bit_depth, notes=notes)
        notes.check_size(*rgb.shape[:2], predictor.image_size, str(item.path))
        return rgb, predictor.preprocess(rgb)
    except predictor.read_error as e:
        return None, str(e)
    except Exception as e:  # any decoder failure (e.g. Pillow's decompression-bomb guard) skips this file only
        return None, f"cannot read image {item.path}: {type(e).__name__}: {e}"


def score_inputs(items: Sequence[InputFile], predictor, batch_size: int, bit_depth: int = 16, notes=None,
                 predict: Optional[Callable] = None) -> Iterator[tuple[list, list]]:
    """``predict``'s loop: per batch of ``batch_size`` files, ``(skipped, scored)``: the unreadable ones as
    ``(item, reason)`` and the others as ``(item, rgb, score, smoothed map)``. ``predict`` replaces
    ``predictor.predict`` (preprocessed images -> scores, maps), e.g. to count model calls."""
    predict = predict or predictor.predict
    for start in range(0, len(items), batch_size):
        skipped, batch = [], []
        for item in items[start:start + batch_size]:
            rgb, x = load_input(item, predictor, bit_depth, notes)
            if rgb is None:
                skipped.append((item, x))
            else:
                batch.append((item, rgb, x))
        scored = []
        if batch:
            scores, maps = predict([x for _, _, x in batch])
            scored = [(item, rgb, score, amap) for (item, rgb, _), score, amap in zip(batch, scores.tolist(), maps)]
        yield skipped, scored


def run(args: argparse.Namespace, state: Optional[Mapping[str, Any]], info: Optional[CheckpointInfo]) -> int:
    """``predict`` on a settled run; ``state`` and ``info`` are ``None`` with an exported model
    (``--backend onnxruntime|openvino``)."""
    from crane.data.image import InputNotes
    from crane.inspection.outputs import OutputFolder, PredictOutputs

    reference = thresholds = None
    if args.backend == "torch":  # which memory scores is the first thing said (an exported graph: below)
        thresholds = resolve_thresholds(args)
        reference = choose_reference(args, thresholds)
        if reference is not None:
            print(reference.line(args.coreset_ratio, args.few_shot_weight), flush=True)
    collected = collect_inputs(args.inputs, exclude=args.out, include_masks=args.include_masks)
    items = collected.files
    if collected.masks_left_out:
        print(f"note: left out {len(collected.masks_left_out)} ground-truth mask file(s) (*_mask.*, masks/, "
              f"ground_truth/), e.g. {collected.masks_left_out[0]}; --include_masks scores them too", file=sys.stderr)
    if not items:
        raise CraneError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {' '.join(args.inputs)}")
    deployed = None
    if args.backend != "torch":
        from crane.cli.serving import open_predictor, thresholds_note

        choose_reference(args, Thresholds())  # --reference refused before the graph loads
        deployed = open_predictor(args)
        thresholds = resolve_thresholds(args, deployed.thresholds())
        print(thresholds_note(thresholds, deployed, args.force), file=sys.stderr)
    if args.save_masks and thresholds.pixel is None:
        raise CraneError("--save_masks needs a pixel threshold: run `python -m crane calibrate`, or pass "
                       "--threshold IMG,PIX")
    for note in threshold_notes(thresholds, args, info):
        print(note, file=sys.stderr)
    folder = OutputFolder(args.out)
    folder.check()

    from crane.logs import progress

    predictor = deployed or TorchPredictor(args, state, info, reference)
    removed = folder.clean()
    if removed:
        print(f"removed the {removed} files of the earlier predict run in {args.out}", file=sys.stderr)
    outputs = PredictOutputs(folder, args, thresholds.image, thresholds.pixel,
                             None if reference is None else reference.record(predictor.memory))
    skipped: list[tuple[Path, str]] = []
    notes = InputNotes()
    try:
        with progress(total=len(items), desc="predict", unit="img") as bar:
            for unreadable, scored in score_inputs(items, predictor, args.batch_size, args.bit_depth, notes):
                for item, reason in unreadable:
                    skipped.append((item.path, reason))
                    bar.write(f"skipped: {reason}", file=sys.stderr)
                    bar.update(1)
                for item, rgb, score, amap in scored:
                    outputs.write(item.path, item.name, rgb, score, amap)
                    bar.update(1)
    except KeyboardInterrupt:
        outputs.close(skipped)
        print(f"predict: interrupted; {outputs.csv_path} holds the {outputs.rows} images scored so far (with their "
              f"panels); run the same command again to score them all", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException:
        outputs.close(skipped)
        print(f"stopped: {outputs.csv_path} holds the {outputs.rows} images done before the error", file=sys.stderr)
        raise
    outputs.close(skipped)
    for line in notes.lines():
        print(f"note: {line}", file=sys.stderr)
    _predict_summary(args, outputs, thresholds, skipped)
    return EXIT_SKIPPED if skipped else 0


def _predict_summary(args: argparse.Namespace, outputs, thresholds: Thresholds,
                     skipped: list[tuple[Path, str]]) -> None:
    wrote = [f"{outputs.csv_path} ({outputs.rows} images)"]
    if not args.no_panels:
        wrote.append(f"panels in {args.out / 'panels'}/")
    wrote += [f"{folder} in {args.out / folder}/" for folder in ("maps", "masks") if getattr(args, f"save_{folder}")]
    print("wrote " + ", ".join(wrote))
    if thresholds.image is not None:
        overridden = args.threshold and parse_override(args.threshold)[0] is not None
        origin = "--threshold" if overridden else thresholds.source
        print(f"{outputs.anomalous} of {outputs.rows} images anomalous (score >= {thresholds.image:.6g}, from {origin})")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s), listed in {args.out / 'skipped.csv'}:", file=sys.stderr)
        for path, _ in skipped:
            print(f"  {path}", file=sys.stderr)


