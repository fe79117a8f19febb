"""Command line: ``python -m crane {predict,calibrate,export,init-checkpoint,app}`` (also installed as ``crane``).

* ``predict INPUT... --checkpoint FILE --out DIR``: score image files, folders
  (searched recursively) and globs; write ``DIR/scores.csv`` and one panel per image.
* ``calibrate --checkpoint FILE`` with ``--normal DIR... --target_fpr RATE`` (normal
  images only), ``--labelled DIR...`` (``good/`` and defect folders) or ``--dataset NAME``
  (a ``meta.json`` dataset): pick the image and pixel thresholds and save
  ``thresholds.json`` beside the checkpoint, where ``predict`` finds it.
* ``export --checkpoint FILE --out PATH``: the model as one ONNX / OpenVINO graph
  (:mod:`crane.export`); ``predict --backend onnxruntime|openvino --model PATH`` runs it.
* ``init-checkpoint OUT``: write a randomly initialised prompt-learner checkpoint
  (for pipeline demos only).
* ``app``: the inspection page and its HTTP API (:mod:`crane.integrations.app`; the
  optional extra ``app``), with its own options.

The model settings come from the checkpoint unless a flag sets them (:mod:`crane.cli_setup`).
Exit status: 0 success, 1 an error (one line on stderr), 2 unusable input (one line per
problem, before any model work), 3 ``predict``/``calibrate`` skipped unreadable files (the
others were processed), 130 interrupted.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from crane import __version__
from crane.checkpoints import CheckpointInfo
from crane.cli_args import INTERRUPTED, PROMPT_FLAGS, add_bool_flag, add_model_flags, add_precision_flags, \
    add_weight_flags, default_datasets_root, setup_logging
from crane.cli_setup import (MODEL_DEFAULTS, MODEL_OPTIONS, describe_model, flag_errors, model_options,  # noqa: F401
                             model_record, one_line, settle_model, threshold_differences)
from crane.data.folders import IMAGE_SUFFIXES, InputFile, collect_inputs  # noqa: F401  (re-exported)
from crane.thresholds import IMAGE_CRITERIA, Thresholds, default_path, load_thresholds, parse_override, \
    save_thresholds
from crane.export import command as export_command

EXIT_ERROR, EXIT_USAGE, EXIT_SKIPPED = 1, 2, 3


class CliError(Exception):
    """A user-facing error reported as one line (exit status 2)."""


def _user_errors() -> tuple[type, ...]:
    """Errors caused by the input: reported as one line, exit status 2."""
    from crane.checkpoints import CheckpointError
    from crane.cli_setup import SetupError
    from crane.data.folders import InputError
    from crane.data.meta import DatasetError
    from crane.deploy.metadata import NotACraneExport
    from crane.models.errors import CheckpointMismatchError, WeightsNotFoundError
    from crane.predict_outputs import OutputFolderError

    return (CliError, SetupError, InputError, CheckpointError, OutputFolderError, DatasetError, WeightsNotFoundError,
            CheckpointMismatchError, NotACraneExport)


# ------------------------------------------------------------------------------ arguments


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model flags of ``test.py`` (the prompt-learner ones come from the checkpoint)."""
    g = parser.add_argument_group("model (settings the checkpoint records are taken from it unless given)")
    g.add_argument("--checkpoint", metavar="FILE",
                   help="prompt-learner checkpoint file (default: checkpoints/MODEL_NAME/epoch_EPOCH.pth)")
    g.add_argument("--model_name", default="trained_on_mvtec_cranep",
                   help="checkpoint folder under checkpoints/ (default: trained_on_mvtec_cranep)")
    g.add_argument("--epoch", type=int, default=5, help="checkpoint epoch (default: 5)")
    add_weight_flags(g, "openai", defaults_in_help=True)
    add_model_flags(g, MODEL_DEFAULTS, skip=PROMPT_FLAGS, defaults_in_help=True, from_checkpoint=True)
    add_bool_flag(g, "--force", False, "run with model flags that contradict the checkpoint's settings (and, in "
                                       "predict, with thresholds calibrated for other settings): a warning instead "
                                       "of an error", defaults_in_help=True)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, N or auto (GPU when available) "
                                                    "(default: auto)")
    add_precision_flags(g, defaults_in_help=True)
    g.add_argument("--batch_size", type=int, default=8, help="images per forward pass (default: 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crane", description="Crane zero-shot anomaly detection.",
                                     epilog="Exit status: 0 ok, 1 error, 2 unusable input, 3 unreadable images "
                                            "skipped, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"crane {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="score images and draw anomaly panels",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score images, folders (recursive) and globs; write DIR/scores.csv (path, score, "
                                   "decision) and DIR/panels/<name>.png (original | heat map | overlay).",
                       epilog="Thresholds: thresholds.json beside the checkpoint (from `python -m crane calibrate`) "
                              "gives `decision` (anomalous when score >= image threshold) and the outlined region "
                              "(map >= pixel threshold); it must have been calibrated with this checkpoint and "
                              "these model settings. --thresholds FILE reads another file; --threshold overrides "
                              "it: IMG, IMG,PIX or ,PIX.\nWithout thresholds `decision` is empty and nothing is "
                              "outlined.\nImages are turned as their EXIF orientation says (as photo viewers show "
                              "them). Ground-truth masks (*_mask.*, files under masks/ or ground_truth/) found in "
                              "folders and globs are left out unless --include_masks.\nAn --out folder holding an "
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
    add_bool_flag(p, "--save_maps", False, "also write DIR/maps/<name>.npy (S x S float32 map)", True)
    add_bool_flag(p, "--save_masks", False, "also write DIR/masks/<name>.png (0/255 at the image's size; needs a "
                                            "pixel threshold)", True)
    add_bool_flag(p, "--no_panels", False, "skip the panels (scores only)", True)
    add_bool_flag(p, "--include_masks", False, "also score ground-truth mask files found in folders and globs", True)
    p.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"), default="torch",
                   help="torch: build the model from --checkpoint and the model flags; onnxruntime / openvino: run "
                        "the graph --model written by `python -m crane export` (settings, size and thresholds from "
                        "its metadata) (default: torch)")
    p.add_argument("--model", metavar="PATH", help="exported graph (.onnx, or OpenVINO .xml) for --backend")
    _add_model_flags(p)

    c = sub.add_parser("calibrate", help="pick thresholds (normal images at a false-alarm rate, or labelled images), "
                                         "save thresholds.json",
                       description="Run the model on calibration images and pick the image and pixel thresholds. "
                                   "--target_fpr RATE: thresholds that flag RATE of the normal images and of their "
                                   "pixels, with the false-alarm rate to expect on new normal images and its "
                                   "uncertainty; else the image threshold of max F1 (or Youden's J) and the pixel "
                                   "threshold of max F1 on labelled images. Saves thresholds.json beside the "
                                   "checkpoint unless --output is given.")
    src = c.add_argument_group("calibration images (--normal and --labelled may be combined; --dataset alone)")
    src.add_argument("--normal", nargs="+", type=Path, metavar="DIR",
                     help="folders of normal images (only those under good/ folders when a folder has any; masks "
                          "left out); needs --target_fpr")
    src.add_argument("--labelled", nargs="+", type=Path, metavar="DIR",
                     help="folders with good/ (normal) and defect-type folders (masks, optional, named NAME_mask.* "
                          "in masks/ or ground_truth/)")
    src.add_argument("--dataset", metavar="NAME", help="dataset folder with a meta.json under --datasets_root_dir "
                                                       "(its test split, read as test.py reads it)")
    src.add_argument("--datasets_root_dir", type=Path, metavar="ROOT",
                     help="folder holding one folder per dataset (default: $CRANE_DATASETS, else ./datasets/data)")
    src.add_argument("--classes", nargs="+", metavar="CLASS", help="with --dataset: these classes only "
                                                                   "(default: all)")
    c.add_argument("--target_fpr", type=float, metavar="RATE",
                   help="false-alarm rate to allow on normal images, such as 0.01")
    c.add_argument("--image_criterion", choices=IMAGE_CRITERIA, default=None,
                   help="without --target_fpr: f1 (max F1) or youden (max TPR - FPR) (default: f1)")
    c.add_argument("--output", type=Path, metavar="FILE", help="where to write (default: thresholds.json beside "
                                                                "--checkpoint)")
    c.add_argument("--num_workers", "--workers", dest="num_workers", type=int, default=0,
                   help="with --dataset: data loading processes (default: 0)")
    _add_model_flags(c)

    export_command.add_parser(sub)
    sub.add_parser("app", add_help=False, help="inspect and calibrate in the browser (pip install -e '.[app]'; "
                                               "options: python -m crane app --help)")

    i = sub.add_parser("init-checkpoint", help="write a randomly initialised prompt-learner checkpoint (demos)",
                       description="Write an untrained prompt-learner checkpoint. Its predictions are meaningless: "
                                   "it exists so the pipeline can run without the official checkpoints.")
    i.add_argument("out", type=Path, metavar="OUT", help="checkpoint file to write")
    i.add_argument("--clip_weights", default="synthetic", metavar="W",
                   help="CLIP whose token embedding builds the prompt buffers (default: synthetic)")
    i.add_argument("--seed", type=int, default=0, help="(default: 0)")
    return parser


# ------------------------------------------------------------------------------- model


def build_detector(args: argparse.Namespace, info: CheckpointInfo):
    """A :class:`crane.Detector` from the model flags (settled by :func:`crane.cli_setup.settle_model`)."""
    from crane.detector import Detector, build_model
    from crane.models.crane import CraneConfig

    print(f"loading the model ({args.checkpoint}): {describe_model(args, info)} ...", file=sys.stderr)
    try:
        model = build_model(args.clip_weights, args.checkpoint, args.dino_weights, CraneConfig.from_options(args))
    except ValueError as e:  # e.g. --features_list outside a tower read from a TorchScript file
        if isinstance(e, _user_errors()):
            raise
        raise CliError(str(e)) from None
    return Detector(model, args.device, args.precision, args.batch_size, args.compile)


class _TorchPredictor:
    """``predict``'s torch backend: :meth:`Detector.predict_tensor` with the smoothing on the device, as
    test.py. ``crane.deploy.serving.DeployPredictor`` is the same interface for exported graphs."""

    def __init__(self, args: argparse.Namespace, info: CheckpointInfo) -> None:
        from crane.data.image import ImageReadError

        self.detector = build_detector(args, info)
        self.image_size = self.detector.config.image_size
        self.read_error = ImageReadError

    @staticmethod
    def load_rgb(path: Path):
        """The image as photo viewers show it (EXIF orientation applied)."""
        from crane.data.image import load_rgb

        return load_rgb(path, exif_orientation=True)

    def preprocess(self, rgb):
        from crane.data.image import preprocess

        return preprocess(rgb, self.image_size)

    def predict(self, batch: list):
        """Preprocessed images -> (scores ``B``, smoothed maps ``B x S x S``), numpy float32."""
        import torch

        scores, maps = self.detector.predict_tensor(torch.stack(batch), smooth=True)
        return scores.numpy(), maps.numpy()


# --------------------------------------------------------------------------- thresholds


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
        raise CliError(str(e)) from None
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


def _threshold_notes(thresholds: Thresholds, args: argparse.Namespace, info: Optional[CheckpointInfo]) -> list[str]:
    """One-line notes on missing thresholds; a file calibrated with another checkpoint or other model
    settings is refused (:class:`CliError`), or with ``--force`` gives a warning. ``info`` is ``None``
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
    if info is not None and _file_values_used(thresholds, args):
        differ = threshold_differences(thresholds.meta.get("model"), model_record(args, info))
        if differ:
            message = (f"{thresholds.source} was calibrated for other scores: {'; '.join(differ)}")
            if not args.force:
                raise CliError(f"{message}; calibrate again for this run, use the calibrated settings, or pass "
                               "--force")
            notes.append(f"warning: {message} (--force: using it anyway; decisions may be wrong)")
    return notes


# ------------------------------------------------------------------------------ predict


def _load(item: InputFile, predictor):
    """``(rgb, preprocessed)`` of one file (turned as its EXIF orientation says), or ``(None, reason)``
    when it cannot be read."""
    try:
        rgb = predictor.load_rgb(item.path)
        return rgb, predictor.preprocess(rgb)
    except predictor.read_error as e:
        return None, str(e)
    except Exception as e:  # any decoder failure (e.g. Pillow's decompression-bomb guard) skips this file only
        return None, f"cannot read image {item.path}: {type(e).__name__}: {e}"


def cmd_predict(args: argparse.Namespace, info: Optional[CheckpointInfo]) -> int:
    """``predict``; ``info`` is ``None`` with an exported model (``--backend onnxruntime|openvino``)."""
    from crane.predict_outputs import OutputFolder, PredictOutputs

    collected = collect_inputs(args.inputs, exclude=args.out, include_masks=args.include_masks)
    items = collected.files
    if collected.masks_left_out:
        print(f"note: left out {len(collected.masks_left_out)} ground-truth mask file(s) (*_mask.*, masks/, "
              f"ground_truth/), e.g. {collected.masks_left_out[0]}; --include_masks scores them too", file=sys.stderr)
    if not items:
        raise CliError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {' '.join(args.inputs)}")
    deployed = None
    if args.backend != "torch":
        from crane.deploy.serving import open_predictor, thresholds_note

        deployed = open_predictor(args, {"clip_weights": "openai", **vars(MODEL_DEFAULTS)}, CliError)
    thresholds = resolve_thresholds(args, None if deployed is None else deployed.thresholds())
    if deployed is not None:
        print(thresholds_note(thresholds, deployed, args.force, CliError), file=sys.stderr)
    if args.save_masks and thresholds.pixel is None:
        raise CliError("--save_masks needs a pixel threshold: run `python -m crane calibrate`, or pass "
                       "--threshold IMG,PIX")
    for note in _threshold_notes(thresholds, args, info):
        print(note, file=sys.stderr)
    folder = OutputFolder(args.out)
    folder.check()

    from tqdm import tqdm

    predictor = deployed or _TorchPredictor(args, info)
    removed = folder.clean()
    if removed:
        print(f"removed the {removed} files of the earlier predict run in {args.out}", file=sys.stderr)
    outputs = PredictOutputs(folder, args, thresholds.image, thresholds.pixel)
    skipped: list[tuple[Path, str]] = []
    try:
        with tqdm(total=len(items), desc="predict", unit="img", file=sys.stderr) as bar:
            for start in range(0, len(items), args.batch_size):
                batch = []
                for item in items[start:start + args.batch_size]:
                    rgb, x = _load(item, predictor)
                    if rgb is None:
                        skipped.append((item.path, x))
                        bar.write(f"skipped: {x}", file=sys.stderr)
                        bar.update(1)
                    else:
                        batch.append((item, rgb, x))
                if not batch:
                    continue
                scores, maps = predictor.predict([x for _, _, x in batch])
                for (item, rgb, _), score, amap in zip(batch, scores.tolist(), maps):
                    outputs.write(item.path, item.name, rgb, score, amap)
                    bar.update(1)
    except KeyboardInterrupt:
        outputs.close(skipped)
        print(f"predict: interrupted; {outputs.csv_path} holds the {outputs.rows} images scored so far (with their "
              f"panels); run the same command again to score them all", file=sys.stderr)
        return INTERRUPTED
    except BaseException:
        outputs.close(skipped)
        print(f"stopped: {outputs.csv_path} holds the {outputs.rows} images done before the error", file=sys.stderr)
        raise
    outputs.close(skipped)
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


# ---------------------------------------------------------------------------- calibrate


def _calibration_images(args: argparse.Namespace):
    """The calibration images: ``(CraneDataset or None, folder samples, their labels, what to record
    about them)``; checks the choice of images and criterion (:class:`CliError`)."""
    from crane.data.folders import folder_samples

    if args.dataset is not None and (args.normal or args.labelled):
        raise CliError("pass either --dataset (a meta.json dataset) or --normal/--labelled folders, not both")
    if args.dataset is None and not (args.normal or args.labelled):
        raise CliError("calibrate needs images: --normal DIR --target_fpr RATE (normal images only), --labelled DIR "
                       "(good/ and defect folders) or --dataset NAME (a meta.json dataset)")
    if args.target_fpr is not None and args.image_criterion is not None:
        raise CliError("--target_fpr and --image_criterion both choose the image threshold: pass one of them")
    if args.normal and args.target_fpr is None:
        raise CliError("--normal images alone set thresholds at a false-alarm rate: pass --target_fpr RATE "
                       "(such as 0.01)")
    if args.dataset is not None:
        from crane.data.dataset import CraneDataset

        dataset = CraneDataset(args.datasets_root_dir / args.dataset, "test", image_size=args.image_size,
                               classes=args.classes)
        labels = [bool(s["anomaly"]) for s in dataset.samples]
        record = {"dataset": args.dataset, "datasets_root_dir": str(args.datasets_root_dir), "split": "test",
                  "classes": dataset.classes}
        return dataset, [], labels, record
    samples = []
    for folder in args.normal or []:
        found = folder_samples(folder)
        normal = [s for s in found if not s.anomaly]
        if len(normal) < len(found):
            print(f"note: --normal {folder}: using the {len(normal)} images under its good/ folders, not the "
                  f"{len(found) - len(normal)} in other folders (pass it to --labelled to count them as defects)",
                  file=sys.stderr)
        samples += normal
    for folder in args.labelled or []:
        samples += folder_samples(folder, labelled=True)
    samples = list({s.path.resolve(): s for s in samples}.values())
    record = {"normal_folders": [str(f) for f in args.normal or []],
              "labelled_folders": [str(f) for f in args.labelled or []]}
    return None, samples, [bool(s.anomaly) for s in samples], record


def cmd_calibrate(args: argparse.Namespace, info: CheckpointInfo) -> int:
    from tabulate import tabulate

    from crane.calibration import CalibrationScores, pick_false_alarm, pick_labelled, run_dataset, run_samples

    dataset, samples, labels, source = _calibration_images(args)
    anomalous, total = sum(labels), len(labels)
    where = args.dataset or " ".join(str(f) for f in (args.normal or []) + (args.labelled or []))
    if args.target_fpr is None and anomalous in (0, total):
        raise CliError(f"{where}: labelled calibration needs normal and defect images, found {anomalous} defect "
                       f"images of {total}; with normal images only, pass --target_fpr RATE")
    if args.target_fpr is not None and anomalous == total:
        raise CliError(f"{where}: no normal images to set a false-alarm rate on ({total} defect images)")
    output = Path(args.output or default_path(args.checkpoint)).expanduser()
    folder = next(p for p in (output.parent, *output.parent.parents) if p.exists())
    if not os.access(folder, os.W_OK):
        raise CliError(f"cannot write {output} (no write permission in {folder}); pass --output FILE and give "
                       "predict --thresholds FILE")
    detector = build_detector(args, info)
    scores = CalibrationScores.for_run(args.target_fpr, total - anomalous, detector.config.image_size)
    skipped: list[tuple[Path, str]] = []
    if dataset is not None:
        run_dataset(detector, dataset, args.batch_size, args.num_workers, scores)
    else:
        skipped = run_samples(detector, samples, args.batch_size, scores)
    _, kept = scores.arrays()
    if (~kept).sum() == 0 or (args.target_fpr is None and kept.sum() == 0):
        raise CliError(f"{where}: too few readable images left to calibrate on ({len(skipped)} unreadable)")
    picked = pick_labelled(scores, args.image_criterion or "f1") if args.target_fpr is None else \
        pick_false_alarm(scores, args.target_fpr)
    calibration = {**source, **picked.record}
    if skipped:
        calibration["skipped"] = [[str(path), reason] for path, reason in skipped]
    thresholds = Thresholds(picked.image, picked.pixel, {
        **picked.criteria, "calibration": calibration, "model": model_record(args, info),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "crane_version": __version__})
    save_thresholds(thresholds, output)
    for note in picked.notes:
        print(note, file=sys.stderr)
    print(tabulate(picked.rows, headers=picked.headers))
    for line in picked.summary:
        print(line)
    print(f"wrote {output}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s) (listed in {output}):", file=sys.stderr)
        for path, _ in skipped:
            print(f"  {path}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


# ----------------------------------------------------------------------- init-checkpoint


def cmd_init_checkpoint(args: argparse.Namespace) -> int:
    import open_clip
    import torch

    from crane.models.clip_loader import load_clip
    from crane.models.prompts import PromptLearner, save_prompt_checkpoint

    weights = args.clip_weights
    if weights == "synthetic":
        from crane.models.synthetic import synthetic_clip_state_dict

        weights = synthetic_clip_state_dict()
    clip = load_clip(weights)
    torch.manual_seed(args.seed)
    learner = PromptLearner(clip.token_embedding, open_clip.get_tokenizer("ViT-L-14-336"))
    save_prompt_checkpoint(learner, args.out)
    print(f"wrote {args.out} (random prompts: predictions made with it are meaningless)")
    return 0


# ---------------------------------------------------------------------------------- main


MODEL_COMMANDS = {"predict": cmd_predict, "calibrate": cmd_calibrate}
COMMANDS = {"init-checkpoint": cmd_init_checkpoint, "export": export_command.run}


def _run(args: argparse.Namespace) -> int:
    if args.command not in MODEL_COMMANDS:
        return COMMANDS[args.command](args)
    exported = getattr(args, "backend", "torch") != "torch"  # an exported graph carries its checkpoint and settings
    if exported:
        for key, value in vars(MODEL_DEFAULTS).items():
            if not hasattr(args, key):
                setattr(args, key, value)
    elif args.checkpoint is None:
        args.checkpoint = str(Path("checkpoints") / args.model_name / f"epoch_{args.epoch}.pth")
    if args.command == "calibrate" and args.datasets_root_dir is None:
        args.datasets_root_dir = Path(default_datasets_root())
    errors = flag_errors(args)
    if not exported and getattr(args, "model", None):
        errors.append("--model is for --backend onnxruntime|openvino; the torch backend builds the model from "
                      "--checkpoint")
    if errors:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if exported:
        return cmd_predict(args, None)
    info, notes = settle_model(args)
    for note in notes:
        print(note, file=sys.stderr)
    return MODEL_COMMANDS[args.command](args, info)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m crane`` / ``crane``; returns the exit status."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["app"]:  # its own parser, imported only when asked for (Gradio is an optional extra)
        from crane.integrations.app.command import main as app_main

        return app_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"{args.command}: interrupted before any result was written; run the same command again",
              file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"error: {one_line(str(e))}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, (OSError, ValueError, RuntimeError)):
            print(f"error: {one_line(str(e) or type(e).__name__)}", file=sys.stderr)
            return EXIT_ERROR
        raise
